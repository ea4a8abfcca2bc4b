"""Command-line pieces shared by several commands: policy arguments, checked numbers and files, where text goes.

Nothing here imports torch: building the parser (and so ``--help``) must stay instant.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvpolicies.errors import PolicyConfigError, UsageError
from kvpolicies.integrations.loading import DTYPE_NAMES as DTYPE_CHOICES  # the one list of dtypes


def whole_number(minimum: int):
    """An argparse type: a whole number ≥ ``minimum`` (0 tokens, 0 chunks or -1 samples are mistakes, not defaults)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {value}")
        return value

    parse.__name__ = f"whole number >= {minimum}"  # argparse names the type in its messages
    return parse


positive_int = whole_number(1)
non_negative_int = whole_number(0)


def path(text: str) -> Path:
    """An argparse type: a file or folder, never an empty value (``--results "$DIR"`` with ``DIR`` unset would
    otherwise be the current folder, and fill it with result files)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty value; give a file or folder, or leave the "
                                         "option out for its default")
    return Path(text)


path.__name__ = "path"


def text(what: str):
    """An argparse type: a non-empty value (an empty ``--address`` is an unset variable, not a choice)."""

    def parse(value: str) -> str:
        if not value.strip():
            raise argparse.ArgumentTypeError(f"expected {what}, got an empty value; give one, or leave the option out "
                                             "for its default")
        return value.strip()

    parse.__name__ = what
    return parse


def comma_separated(what: str):
    """An argparse type: comma-separated items, none of them empty. ``--budgets "$B"`` with ``B`` unset, or
    ``l2norm,,h2o``, is a mistake: read as "no value", it would run a default the user did not ask for."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",")]
        if not text.strip():
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got an empty value; give at least "
                                             "one, or leave the option out for its default")
        if not all(items):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r} with an empty item; "
                                             "remove the extra comma")
        return items

    parse.__name__ = f"list of {what}"  # argparse names the type in its messages
    return parse


def whole_numbers(minimum: int):
    """An argparse type: comma-separated whole numbers, each ≥ ``minimum`` (``1024,2048``)."""
    one, items = whole_number(minimum), comma_separated("whole numbers")

    def parse(text: str) -> list[int]:
        return [one(item) for item in items(text)]

    parse.__name__ = "list of whole numbers"
    return parse


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (exclusive), got {value:g}")
    return value


def positive_number(text: str) -> float:
    """An argparse type: a finite number above 0 (``--memory 80``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    """``--model`` and how it is loaded (:class:`~kvpolicies.integrations.loading.Loading`)."""
    from kvpolicies.integrations.loading import add_loading_arguments

    parser.add_argument("--model", help="model id, folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    if dtype:
        parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: bfloat16 on CUDA, float32 on CPU")
    add_loading_arguments(parser, device_and_dtype=False)


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default="l2norm", help="policy name (see `kvpolicies list`)")
    add_budget_arguments(parser)
    parser.add_argument("--budget-slack", type=non_negative_int, metavar="N",
                        help="entries a head may grow past its share while generating before eviction runs again "
                             "(default: 16; 0 evicts at every step)")
    parser.add_argument("--budget-windows", choices=("share", "keep"),
                        help="sliding-window layers (Gemma, Mistral): 'share' the budget like any layer, or 'keep' "
                             "their whole window and cut the full-attention layers only (default: share)")
    parser.add_argument("--codec", default="full",
                        help="how kept entries are stored: full, int8, int4, ... (see `kvpolicies list`); the "
                             "budget in bytes buys entries at the codec's price (default: full)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="policy option (JSON value), repeatable"
    )
    add_model_arguments(parser)


def add_budget_arguments(parser: argparse.ArgumentParser, default: str = "0.5", help_tail: str = "") -> None:
    """``--budget`` (the kept share, or tokens, or bytes) or, as kvpress writes it, ``--compression-ratio``."""
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--budget", help=f"0.5 | 50%% | '512 tokens' | 64MiB (default: {default}){help_tail}")
    given.add_argument("--compression-ratio", metavar="R",
                       help="kvpress's convention instead of --budget: the fraction removed, 0.75 = --budget 0.25")
    parser.set_defaults(budget_default=default)


def budget_of(args: argparse.Namespace, slack_tokens: int | None = None, windows: str | None = None):
    """The Budget that ``--budget`` or ``--compression-ratio`` names (the default budget when neither is given)."""
    from kvpolicies.engine.budget import Budget

    if args.compression_ratio is not None:
        return Budget.from_compression_ratio(args.compression_ratio, slack_tokens=slack_tokens, windows=windows)
    return Budget.parse(args.budget if args.budget is not None else args.budget_default, slack_tokens=slack_tokens,
                        windows=windows)


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["window_tokens=32", "uncompressed_layers=[]"]`` → ``{"window_tokens": 32, "uncompressed_layers": []}``."""
    from kvpolicies.engine.policy import coerce_option

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise PolicyConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = coerce_option(text)
    return options


def read_text_file(path: Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``, or a UsageError that says why it cannot be read."""
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a text file")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte {error.start}: {error.reason}); convert it, e.g. "
                         f"with iconv -t utf-8") from None
    except OSError as error:
        raise UsageError(f"cannot read {what} {path}: {error.strerror}") from None


def write_or_print(text: str, output: Path | None) -> None:
    """Write a command's result to ``output`` (saying so on stderr), or print it to stdout."""
    if output:
        try:
            output.write_text(text)
        except OSError as error:
            raise UsageError(f"cannot write {output}: {error.strerror}") from None
        print(f"wrote {output}", file=sys.stderr)
    else:
        print(text)
