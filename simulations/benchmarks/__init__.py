"""The benchmarks room: measurements run by command, never as tests, each against its baseline
in the same run (`python -m simulations.benchmarks <name>`, the dispatcher in cli.py; the
latest figures in benchmarks.md).

  step.py         1  the local step: NextQuill against ContextSFT and the authors' computation
  scale.py        2  simulated users per hour in a real Flower simulation
  comm.py         3  upload bytes per split and transport dtype
  dce.py          4  the expert pass, amortized over rounds
  edge.py         5  a client round's peak memory, phase by phase
  deployment.py   6  SecAgg+ and the wire on a real loopback deployment
  reload.py       7  a deployed device's set-up per message
  model_shapes.py    models of a published shape with random weights
"""
