"""The study room: NextQuill-Fed against every baseline and ablation, and the experiments
around it.

  protocol.py        the rows, the study's settings, the run config of one cell
  cells.py           one cell run: federated, central, the expert's DCE, the data's profile
  runner.py          the resumable command (`python -m simulations.study`, `nextquill study`)
  report.py          the report from the cells; paired.py its paired differences and DCE
                     table; outputs.py the generated texts, budgets and headroom
  tune.py            NextQuill's settings chosen on a validation split
  expert_budget.py   DCE against the expert's training budget
  memorization.py    a canary's exposure
  compare.py         the single-device comparison (its settings in compare_config.py)
"""
