"""The ``qfusion`` command line: one sub-command per job (``qfusion <command> --help``)."""

from __future__ import annotations

import argparse
import sys


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the CPU end-to-end demo and print its result table")
    p.add_argument("--quick", action="store_true", help="a short run (CI smoke test)")
    p.add_argument("--out", default="demo_out", help="folder for results.json and the plot")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from qfusion.demo import run_demo

    return run_demo(quick=args.quick, out_dir=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qfusion", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo,):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
