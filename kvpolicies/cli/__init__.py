"""The ``kvpolicies`` command. Results go to stdout; progress and logs go to stderr.

Bad input of any kind ends as ``kvpolicies: error: <what and how to fix it>`` with exit status 2; a traceback means a
bug. A plugin's own failure is reported the same way (a :class:`~kvpolicies.errors.PluginError` naming it);
``--debug`` (anywhere on the line) or ``KVPOLICIES_DEBUG=1`` (for ``kvpolicies lm-eval``, whose arguments all go to
lm-eval) prints the traceback before that line, the original exception's first. Command modules import torch and
transformers only inside the commands that need them, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from kvpolicies.cli import lm_eval, policies, reports, selfcheck, sweeps
from kvpolicies.cli.options import parse_options
from kvpolicies.errors import KVPoliciesError, describe

__all__ = ["build_parser", "main", "parse_options"]


DEBUG_ENV = "KVPOLICIES_DEBUG"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    while argv[:1] == ["--debug"]:  # before the command: also for lm-eval, whose own arguments follow it
        debug, argv = True, argv[1:]
    try:
        if argv[:1] == ["lm-eval"]:
            return lm_eval.run_lm_eval(argv[1:])
        args = build_parser().parse_args(argv)
        debug = debug or args.debug
        return args.run(args)
    except KVPoliciesError as error:
        if debug:
            traceback.print_exception(error)  # a PluginError's cause, the plugin's own traceback, comes first
        return fail(str(error))
    except KeyboardInterrupt:  # Ctrl-C is how a user stops a command, not a bug
        print("kvpolicies: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kvpolicies list | head`: the reader left, which is not an error
        sys.stderr.close()
        return 0
    except Exception as error:
        from pydantic import ValidationError

        if isinstance(error, ValidationError):
            return fail(f"{error.title}: {describe(error)}")
        raise


def version() -> str:
    """The installed distribution's version (a checkout installed with ``pip install -e .`` has one too)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("kvpolicies")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "(not installed)"


def fail(message: str) -> int:
    print(f"kvpolicies: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpolicies",
        description="Compare KV-cache eviction policies under equal memory budgets. Results go to stdout; progress "
        "and logs go to stderr.",
    )
    debug_help = f"on an error, print its traceback first (also {DEBUG_ENV}=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    parser.add_argument("--version", action="version", version=f"kvpolicies {version()}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    for module in (policies, sweeps, lm_eval, reports, selfcheck):
        module.add_commands(commands)
    for command in commands.choices.values():  # after the command too; SUPPRESS keeps a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser
