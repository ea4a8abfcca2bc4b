"""Command-line pieces shared by several commands: policy arguments and where a command's text goes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvpolicies.policy import PolicyConfigError, coerce_option


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default="l2norm", help="policy name (see `kvpolicies list`)")
    parser.add_argument("--budget", default="0.5", help="0.5 | 50%% | '512 tokens' | 64MiB (default: 0.5)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="policy option (JSON value), repeatable"
    )
    parser.add_argument("--model", help="model id, folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["window_tokens=32", "uncompressed_layers=[]"]`` → ``{"window_tokens": 32, "uncompressed_layers": []}``."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise PolicyConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = coerce_option(text)
    return options


def write_or_print(text: str, output: Path | None) -> None:
    """Write a command's result to ``output`` (saying so on stderr), or print it to stdout."""
    if output:
        output.write_text(text)
        print(f"wrote {output}", file=sys.stderr)
    else:
        print(text)
