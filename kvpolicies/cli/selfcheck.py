"""`kvpolicies selfcheck`: what to run first on a new device or model (the checks are in
:mod:`kvpolicies.experiments.selfcheck`)."""

from __future__ import annotations

import argparse
import sys

from kvpolicies.cli.options import (
    DTYPE_CHOICES,
    add_budget_arguments,
    budget_of,
    comma_separated,
    non_negative_int,
    positive_int,
    whole_number,
)
from kvpolicies.errors import UsageError

DEFAULT_POLICIES = ["snapkv", "headkv"]
DEFAULT_CONTEXT = 512
MATRIX_CONTEXT = 64
"""Prompt tokens of the architecture matrix's checks: its models have 256 positions and windows of 8."""


def add_commands(commands) -> None:
    selfcheck = commands.add_parser(
        "selfcheck", help="check the compressed cache on this device and model: exact at budget 1.0, batch = alone, "
                          "bytes, syncs, speed, long context",
        description="Check, on this device and model, what the rest of kvpolicies relies on: budget 1.0 gives the "
                    "model's own logits; a left-padded batch gives each prompt what it gets alone; resident bytes "
                    "are the physical limit; a decoding step syncs no more than the plain model; decoding is about "
                    "as fast as a dense cache of the kept length; a long prompt prefilled in chunks stays at its "
                    "budget. One line per check; exit status 1 if any fails. The speed line is a warning ('slow'), "
                    "not a failure, unless --strict is given: timings on a shared machine are noisy.",
    )
    source = selfcheck.add_mutually_exclusive_group()
    source.add_argument("--model", help="model id, folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    source.add_argument("--random-model", metavar="SHAPE[:LAYERS]",
                        help="random weights of a real architecture, e.g. llama3-8b:2 (prompts: random ids)")
    source.add_argument("--architectures", nargs="?", const=["all"], type=comma_separated("architecture names"),
                        metavar="NAMES",
                        help="instead of one model, the architecture matrix: a tiny random-weight model of every "
                             "family kvpolicies supports (or of those named), checks 1-4 on each")
    selfcheck.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    selfcheck.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: bfloat16 on CUDA, float32 on CPU")
    selfcheck.add_argument("--policies", type=comma_separated("policy names"), default=DEFAULT_POLICIES,
                           help="comma-separated compressing policies; checks 1-4 run for each, the speed and long "
                                f"context checks for the first (default: {','.join(DEFAULT_POLICIES)})")
    add_budget_arguments(selfcheck, "0.25", help_tail="; of the sync, speed and long-context checks, the batch "
                         "check using 0.5 and evicting at every step")
    selfcheck.add_argument("--context", type=whole_number(64), metavar="N",
                           help=f"prompt tokens of the short checks (default: {DEFAULT_CONTEXT}, {MATRIX_CONTEXT} "
                                "with --architectures)")
    selfcheck.add_argument("--decode", type=positive_int, default=4, metavar="N",
                           help="decoding steps per check, and per timed block (default: 4)")
    selfcheck.add_argument("--long-context", type=non_negative_int, metavar="N",
                           help="prompt tokens of the chunked-prefill check (default: 32768 on CUDA, capped at the "
                                "model's positions; skipped elsewhere); 0 skips it")
    selfcheck.add_argument("--prefill-chunk", type=whole_number(2), metavar="N",
                           help="chunk of the long-context prefill (default: 2048, at most a quarter of the prompt)")
    selfcheck.add_argument("--strict", action="store_true",
                           help="a slow decode (over 1.2x the dense cache) fails the run instead of warning")
    selfcheck.set_defaults(run=run_selfcheck)


def run_selfcheck(args: argparse.Namespace) -> int:
    import platform

    import torch
    import transformers

    from kvpolicies.experiments.bench import _load
    from kvpolicies.experiments.selfcheck import SelfCheckSettings, failed, run_selfcheck, table
    from kvpolicies.integrations.models import resolve_device
    from kvpolicies.registry import get_policy

    for name in args.policies:  # before anything loads
        if not get_policy(name).compresses:
            raise UsageError(f"policy {name!r} keeps the whole cache, so there is nothing to check; give compressing "
                             f"policies, e.g. --policies {','.join(DEFAULT_POLICIES)}")
    budget = budget_of(args)
    if budget.unit == "fraction" and budget.value >= 1:
        given = "--compression-ratio 0" if args.compression_ratio is not None else "--budget 1"
        raise UsageError(f"{given} keeps the whole cache, so nothing is evicted to check; give a smaller budget, e.g. "
                         "--budget 0.25 (--compression-ratio 0.75)")
    resolve_device(args.device)  # `--device cuda` without CUDA: said now, not after loading
    if args.architectures:
        return _matrix(args, budget)
    args.context = args.context or DEFAULT_CONTEXT
    what = f"random-weight {args.random_model}" if args.random_model else args.model or "the embedded model"
    print(f"kvpolicies: loading {what} ...", file=sys.stderr)
    model, tokenizer = _load(args.model, args.device, args.dtype, args.random_model)
    positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    longest = args.context + (SelfCheckSettings.repeats + 1) * args.decode  # the speed check's warm-up and blocks
    if positions and longest > positions:
        raise UsageError(f"--context {args.context} with --decode {args.decode} runs {longest} tokens, but the model "
                         f"has {positions} positions; give a shorter --context")
    if positions and args.long_context and args.long_context > positions:
        raise UsageError(f"--long-context {args.long_context}: the model was trained for {positions} positions; give "
                         f"at most {positions}")
    settings = SelfCheckSettings(policies=args.policies, budget=budget, context_tokens=args.context,
                                 decode_tokens=args.decode, long_context=args.long_context,
                                 prefill_chunk=args.prefill_chunk)
    results = run_selfcheck(model, tokenizer, settings,
                            progress=lambda message: print(f"kvpolicies selfcheck: {message}", file=sys.stderr))
    where = (torch.cuda.get_device_name(model.device) if model.device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    name = f"random-weight {args.random_model}" if args.random_model else args.model or "embedded SmolLM2-135M-Instruct"
    print(f"model: {name}, device: {model.device} ({where}), dtype: {model.dtype}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, context: {args.context} tokens\n")
    print(table(results))
    if any(result.verdict.value == "slow" for result in results) and not args.strict:
        print("slow: a timing past its target, a warning only (timings on a shared machine are noisy); --strict "
              "makes it a failure")
    return 1 if failed(results, strict=args.strict) else 0


def _matrix(args: argparse.Namespace, budget) -> int:
    """``selfcheck --architectures``: checks 1 to 4 on each model of the architecture matrix, one table."""
    import dataclasses

    import torch
    import transformers

    from kvpolicies.errors import BudgetError, ModelLoadError
    from kvpolicies.experiments.architectures import ARCHITECTURES, COMMON, build
    from kvpolicies.experiments.selfcheck import CheckResult, SelfCheckSettings, Verdict, failed, run_selfcheck, table
    from kvpolicies.integrations.models import resolve_device, resolve_dtype

    names = sorted(ARCHITECTURES) if args.architectures == ["all"] else args.architectures
    if unknown := [name for name in names if name not in ARCHITECTURES]:
        raise UsageError(f"--architectures {','.join(unknown)}: not in the matrix; give some of "
                         f"{', '.join(sorted(ARCHITECTURES))}, or none for all")
    if args.long_context or args.prefill_chunk:
        raise UsageError("--architectures runs checks 1-4 only (its models have 256 positions); drop --long-context "
                         "and --prefill-chunk, or check one model with --model or --random-model")
    context = args.context or MATRIX_CONTEXT
    longest = context + args.decode
    if longest > COMMON["max_position_embeddings"]:
        raise UsageError(f"--context {context} with --decode {args.decode} runs {longest} tokens, but the matrix's "
                         f"models have {COMMON['max_position_embeddings']} positions; give a shorter --context")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    settings = SelfCheckSettings(policies=args.policies, budget=budget, context_tokens=context,
                                 decode_tokens=args.decode, timed=False)
    results: list[CheckResult] = []
    for name in names:
        print(f"kvpolicies selfcheck: {name}", file=sys.stderr)
        try:
            model = build(ARCHITECTURES[name], dtype, device=device)
        except Exception as error:  # this transformers cannot build the family: a failed line, the others still run
            found = [CheckResult("model", f"error: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}",
                                 "built", Verdict.FAIL)]
        else:
            found = []
            for policy in args.policies:  # one at a time: what one policy cannot run here leaves the others' lines
                try:
                    found += run_selfcheck(model, None, dataclasses.replace(settings, policies=[policy]))
                except (ModelLoadError, BudgetError, UsageError) as error:  # e.g. interleaved RoPE, whole layers
                    found.append(CheckResult(f"refused ({policy})", str(error).splitlines()[0], "checks 1-4",
                                             Verdict.SKIPPED))
        results += [dataclasses.replace(result, check=f"{name}: {result.check}") for result in found]
    print(f"models: the architecture matrix ({len(names)} tiny random-weight configs of transformers' own classes), "
          f"device: {device}, dtype: {dtype}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"context: {context} tokens\n")
    print(table(results))
    return 1 if failed(results) else 0
