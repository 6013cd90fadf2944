"""`python -m backbones --summary [--width W] [--networks r50,mbf]`: parameters and GMACs at 112x112."""

from __future__ import annotations

import argparse

from utils.cli import start_program

from . import NETWORKS
from .summary import summary


def main(argv: list[str] | None = None) -> None:
    start_program()
    parser = argparse.ArgumentParser(prog="python -m backbones", description=__doc__)
    parser.add_argument("--summary", action="store_true", help="print parameters and multiply-adds per backbone")
    parser.add_argument("--networks", default=",".join(NETWORKS), help="comma-separated subset")
    parser.add_argument("--width", type=float, default=1.0, help="channel-width multiplier")
    args = parser.parse_args(argv)
    if not args.summary:
        parser.error("nothing to do: pass --summary")
    networks = tuple(n for n in args.networks.split(",") if n)
    unknown = [n for n in networks if n not in NETWORKS]
    if unknown:
        parser.error(f"unknown network(s) {', '.join(unknown)}; choose from {', '.join(NETWORKS)}")
    column = max(len(n) for n in ("network", *networks)) + 2
    print(f"{'network':<{column}}{'width':>6}{'params':>15}{'GMACs@112':>11}", flush=True)
    for row in summary(networks, args.width):
        print(f"{row['network']:<{column}}{row['width']:>6.2f}{row['params']:>15,}{row['gmacs']:>11.3f}", flush=True)


if __name__ == "__main__":
    main()
