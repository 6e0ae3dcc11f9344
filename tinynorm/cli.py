"""The `tinynorm` command line."""
from __future__ import annotations

import argparse
import sys


def _cmd_gradcheck(args) -> int:
    from . import selfcheck
    return selfcheck.main(rtol=args.rtol)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinynorm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("gradcheck", help="check every built-in op's gradients (float64)")
    p.add_argument("--rtol", type=float, default=1e-6)
    p.set_defaults(func=_cmd_gradcheck)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
