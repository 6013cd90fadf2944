"""Draw a run's loss, learning-rate and validation-accuracy curves from its metrics.jsonl to a PNG.

    python tools/plot_metrics.py work_dirs/synthetic              # -> work_dirs/synthetic/curves.png
    python tools/plot_metrics.py work_dirs/synthetic --out a.png --force
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """metric name -> {step: value}; a step logged twice (a resumed run repeats steps) keeps the later value."""
    series: dict[str, dict[int, float]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{number}: not a metrics record: {line.strip()[:80]!r}") from None
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    series.setdefault(key, {})[step] = float(value)
    return series


def plot(series: dict[str, dict[int, float]], out: Path, title: str) -> None:
    panels = [("loss", ["loss"]), ("learning rate", ["lr"]),
              ("verification accuracy", sorted(k for k in series if k.startswith("val/")))]
    panels = [(name, keys) for name, keys in panels if any(k in series for k in keys)]
    if not panels:
        raise ValueError("no loss, lr or val/* values to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.8 * len(panels)), sharex=True, squeeze=False)
    for ax, (name, keys) in zip(axes[:, 0], panels, strict=True):
        for key in keys:
            steps = sorted(series.get(key, {}))
            ax.plot(steps, [series[key][s] for s in steps], marker="o" if key.startswith("val/") else None,
                    markersize=3, label=key.removeprefix("val/"))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if name == "verification accuracy":
            ax.legend()
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default RUN/curves.png)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing PNG")
    args = parser.parse_args(argv)
    metrics = args.run / "metrics.jsonl"
    out = args.out or args.run / "curves.png"
    if not metrics.is_file():
        parser.error(f"{metrics}: not found (is {args.run} a training run directory?)")
    if out.exists() and not args.force:
        parser.error(f"{out} exists (use --force to overwrite)")
    try:
        plot(read_metrics(metrics), out, args.run.resolve().name)
    except ValueError as e:
        parser.error(str(e))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
