"""Accuracy of a backbone checkpoint on the .bin verification sets in a directory (InsightFace's 10-fold protocol).

    python paddle_pretrainedmodel/model_test.py --network r50 --weights backbone.pdparams --data faces_emore

Embeds each `<target>.bin` found in --data (image + mirror by default), prints accuracy mean +- std per target
with the pair count and the file's checksum, and writes the table to results.txt beside the weights.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import CHOICES
from utils.atomic import write_text_atomic
from utils.cli import USER_ERRORS, check_writable, positive_float, positive_int, start_program

DEFAULT_TARGETS = "lfw,cfp_fp,agedb_30,calfw,cplfw"


def format_table(results: list[dict], missing: list[str]) -> list[str]:
    lines = [f"{'target':<12}{'pairs':>7}  {'sha1':<9}{'accuracy':>18}{'VAL@FAR=1e-3':>20}{'xnorm':>9}"]
    for r in results:
        lines.append(f"{r['name']:<12}{r['num_pairs']:>7}  {r['checksum']:<9}"
                     f"{r['accuracy_mean']:>10.5f}+-{r['accuracy_std']:.5f}{r['val']:>12.5f}+-{r['val_std']:.5f}"
                     f"{r['xnorm']:>9.3f}")
    lines += [f"{name:<12}{'not found':>7}" for name in missing]
    return lines


def main(argv: list[str] | None = None) -> int:
    start_program()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", required=True, choices=CHOICES["network"])
    parser.add_argument("--weights", required=True, type=Path, help="backbone .pdparams (read without running code)")
    parser.add_argument("--data", required=True, type=Path, help="directory holding <target>.bin files")
    parser.add_argument("--targets", default=DEFAULT_TARGETS, help=f"comma-separated (default {DEFAULT_TARGETS})")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                        help="add the mirrored image's embedding (InsightFace's flip test; default on)")
    parser.add_argument("--width", type=positive_float, default=1.0, help="channel width the model was trained with")
    parser.add_argument("--embedding-size", type=positive_int, default=512)
    parser.add_argument("--output", type=Path, help="results file (default: results.txt beside the weights)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing results file")
    args = parser.parse_args(argv)

    output = args.output or args.weights.with_name("results.txt")
    if output.exists() and not args.force:
        parser.exit(1, f"error: {output} exists (use --force to overwrite)\n")
    try:
        check_writable(output)
    except OSError as e:
        parser.exit(1, f"error: {e}{'' if args.output else '; choose another results file with --output'}\n")
    if not args.weights.is_file():
        parser.exit(1, f"error: weights {args.weights} not found\n")
    if not args.data.is_dir():
        parser.exit(1, f"error: data directory {args.data} not found\n")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    found = [t for t in targets if (args.data / f"{t}.bin").is_file()]
    missing = [t for t in targets if t not in found]
    if not found:
        present = sorted(p.name for p in args.data.glob("*.bin")) or ["none"]
        parser.exit(1, f"error: none of {', '.join(targets)} found as <target>.bin in {args.data} "
                       f"(.bin files there: {', '.join(present)})\n")
    for name in missing:
        print(f"warning: {args.data / name}.bin not found, skipped", file=sys.stderr)

    from deploy.embedder import load_backbone
    from eval.verification import load_bin, test

    try:
        model = load_backbone(args.network, args.weights, width=args.width, embedding_size=args.embedding_size)
        results = [test(load_bin(args.data / f"{name}.bin"), model, batch_size=args.batch_size, flip=args.flip)
                   for name in found]
    except USER_ERRORS as e:
        parser.exit(1, f"error: {e}\n")
    table = format_table(results, missing)
    print("\n".join(table))
    header = [f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  network {args.network} "
              f"width {args.width}  weights {args.weights.name}  data {args.data}  flip {args.flip}"]
    try:
        write_text_atomic(output, "\n".join(header + table) + "\n")
    except OSError as e:  # the folder changed during the run
        parser.exit(1, f"error: {output}: cannot be written ({e})\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
