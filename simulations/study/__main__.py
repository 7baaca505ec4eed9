import sys

from simulations.study.runner import main

sys.exit(main())
