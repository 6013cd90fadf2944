"""Train an ArcFace model: backbone data parallel, Partial FC head model parallel.

    python train.py                                   # quick start: built-in synthetic faces, a few CPU minutes
    python train.py --config ms1mv3_r50 --data /data/ms1m-retinaface-t1
    python -m paddle.distributed.launch --nproc_per_node 8 train.py --config glint360k_r100 --data DIR
    python train.py --config ms1mv3_r50 --resume      # continue work_dirs/ms1mv3_r50 from its latest checkpoint
    python train.py --config ms1mv3_r50 --resume work_dirs/ms1mv3_r50/checkpoints/step_0004000 --run_name branch
                                                      # a new run (work_dirs/branch) from another run's checkpoint

Every config key can be overridden (`--KEY VALUE`, see `python train.py --help` and config.py). User mistakes
(missing dataset, bad key, mismatching checkpoint) end with one `train.py: error: ...` line and a non-zero exit;
Ctrl-C ends with one line and status 130. A run holds its directory locked: a second run into it is refused.

The run itself is the package engine/ (its __init__ says which module does what); this file is the command line.
Importing it changes nothing in the process: main() sets Paddle's log level before Paddle is first imported.
"""

from __future__ import annotations

import os
import sys
import warnings

from config import Config, parse_args
from utils.interrupt import sigint_noted


def train(cfg: Config) -> int:
    """Train in `output/run_name` (engine/loop.py); rank 0 holds the directory locked until the run ends (or dies)."""
    from engine.loop import train as run  # imports Paddle: after main() has set its log level

    return run(cfg)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GLOG_minloglevel", "2")  # Paddle's C++ log: errors only; read when Paddle is imported
    cfg = parse_args(argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No ccache found")  # Paddle's note about C++ extensions
        warnings.filterwarnings("ignore", message="Tensor do not have 'place'")  # to_static's own backward builder
        from engine.step import TrainingError
        from utils.cpu import prefer_avx2_mkl

        prefer_avx2_mkl()  # before any Paddle math (utils/cpu.py)
        with sigint_noted() as interrupted:
            try:
                return train(cfg)
            except BaseException as e:
                if interrupted():  # whatever Paddle turned the KeyboardInterrupt into (utils/interrupt.py)
                    print("train.py: interrupted; --resume continues from the last checkpoint", file=sys.stderr)
                    return 130
                if not isinstance(e, (ValueError, OSError, TrainingError)):
                    raise
                # user mistakes (ConfigError and UnsafePickleError are ValueErrors; OSErrors name their file): one line
                print(f"train.py: error: {e}", file=sys.stderr)
                return 1


if __name__ == "__main__":
    sys.exit(main())
