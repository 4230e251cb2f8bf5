"""Entry point of the ``robustness-diag`` command: sub-commands parse their arguments and call a plain ``run``."""
from __future__ import annotations

import argparse
import sys

from robustness_diag.exit_codes import EXIT_USAGE

from . import audit_cmd, correlate_cmd, inspect_cmd
from . import fit_cmd, sample_cmd, score_cmd, toy_cmd
from .options import Parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="robustness-diag",
        description="Tell when a conditional normalizing flow (SRFlow, NCSR, robustNF, ...) will betray you: "
                    "inspect checkpoints, score inputs for OOD risk, and detect exploding inverses while sampling.",
        epilog="Run 'robustness-diag COMMAND --help' for the options of a command.")
    from robustness_diag import __version__
    parser.add_argument("--version", action="version", version=f"robustness-diag {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    inspect_cmd.add_parser(sub)
    fit_cmd.add_parser(sub)
    score_cmd.add_parser(sub)
    sample_cmd.add_parser(sub)
    correlate_cmd.add_parser(sub)
    audit_cmd.add_parser(sub)
    toy_cmd.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "cpu_memory", None):
        from robustness_diag import allocator
        allocator.use(args.cpu_memory)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
