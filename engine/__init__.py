"""The training run behind train.py, in parts with one job each.

- `step.py`: the builders (backbone, head, schedule, optimizer) and `TrainStep`, one optimizer step; train.py and
  the benchmarks (bench/train.py, bench/synth_difficulty.py) step through the same code.
- `setup.py`: the process settings, logger, run directory and data of a run; restored or released when it ends.
- `hooks.py`: what happens between steps: the log line and metrics record, checkpoints, verification.
- `loop.py`: `train(cfg)`, the wiring: setup, build, resume, the loop of steps and hooks, the final save.
"""
