"""The ``kvpolicies`` command. Results go to stdout; progress and logs go to stderr."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from kvpolicies.budget import BudgetError
from kvpolicies.cli import policies, reports, sweeps
from kvpolicies.cli.options import parse_options
from kvpolicies.policy import PolicyConfigError
from kvpolicies.registry import UnknownPolicyError

__all__ = ["build_parser", "main", "parse_options"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:
        from kvpolicies.lm_eval import main as lm_eval_main

        lm_eval_main(argv[1:])
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (UnknownPolicyError, PolicyConfigError, BudgetError, ValidationError, FileNotFoundError) as error:
        print(f"kvpolicies: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpolicies",
        description="Compare KV-cache eviction policies under equal memory budgets. Results go to stdout; progress "
        "and logs go to stderr.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    for module in (policies, sweeps, reports):
        module.add_commands(commands)
    return parser
