import sys

from simulations.benchmarks.cli import main

sys.exit(main())
