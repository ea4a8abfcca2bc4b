"""`kvpolicies list | generate | inspect | head-scores`: policies on one prompt."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tabulate import tabulate

from kvpolicies.cli.options import (
    add_model_arguments,
    add_policy_arguments,
    budget_of,
    parse_options,
    path,
    positive_int,
    read_text_file,
    whole_number,
)
from kvpolicies.errors import UsageError
from kvpolicies.integrations.loading import loading_of
from kvpolicies.integrations.protocol import Protocol

if TYPE_CHECKING:
    from kvpolicies.engine.budget import CacheShape


def add_commands(commands) -> None:
    listing = commands.add_parser("list", help="show the registered policies, their options, and the codecs")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--codecs", action="store_true",
                         help="only the storage codecs (with --json: their rows instead of the policies')")
    listing.set_defaults(run=run_list)

    generate = commands.add_parser("generate", help="generate text with a compressed KV cache")
    generate.add_argument("prompt", nargs="?", help="the prompt (or use --file)")
    generate.add_argument("--file", type=path, help="read the prompt from this file")
    add_policy_arguments(generate)
    generate.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N", help="default: 64")
    generate.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    generate.add_argument("--question", metavar="TEXT",
                          help="a question appended after the prompt (on a new line); it is kept whole, outside the "
                               "budget, and the budget is a fraction of the prompt before it")
    generate.add_argument("--protocol", choices=[protocol.value for protocol in Protocol], default="query_aware",
                          help="compress the prompt with the question in view (query_aware, default) or before it "
                               "is seen (query_agnostic, needs --question)")
    generate.add_argument("--prefill-chunk", type=whole_number(2), metavar="N",
                          help="prefill N tokens at a time, evicting after each chunk (memory follows the budget)")
    generate.set_defaults(run=run_generate)

    inspect = commands.add_parser("inspect", help="show how a policy spreads a budget over layers and KV heads")
    add_policy_arguments(inspect)
    inspect.add_argument("--tokens", type=positive_int, default=2000, metavar="N",
                         help="sequence length of the planned allocation (default: 2000)")
    inspect.add_argument("--file", type=path, help="run this prompt and show the entries actually kept per head")
    inspect.set_defaults(run=run_inspect)

    scores = commands.add_parser("head-scores", help="measure retrieval scores per KV head (for headkv static)")
    scores.add_argument("--output", type=path, required=True, help="JSON file to write")
    scores.add_argument("--samples", type=positive_int, default=8, help="passkey prompts to probe (default: 8)")
    scores.add_argument("--tokens", type=positive_int, default=1000, help="approximate prompt length (default: 1000)")
    scores.add_argument("--seed", type=int, default=0)
    add_model_arguments(scores, dtype=False)
    scores.set_defaults(run=run_head_scores)


def run_list(args: argparse.Namespace) -> int:
    from kvpolicies.registry import list_codecs, list_policies

    if args.codecs:
        if args.json:
            print(json.dumps([codec_row(info) for info in list_codecs()], indent=2))
        else:
            print(codecs_text(list_codecs(), min(shutil.get_terminal_size((100, 24)).columns, 100)))
        return 0
    policies = list_policies()
    if args.json:
        rows = [
            {
                "name": p.name,
                "plugin": p.plugin,
                "summary": p.summary,
                "paper": p.paper,
                "needs": sorted(p.needs),
                "tracks": list(p.tracks),
                "attention_free": p.attention_free,
                "after_prefill_stage": p.stage,
                "options": p.policy_class.Config.model_json_schema()["properties"],
            }
            for p in policies
        ]
        print(json.dumps(rows, indent=2, default=str))
        return 0
    width = min(shutil.get_terminal_size((100, 24)).columns, 100)
    blocks = []
    for p in policies:
        reads = ", ".join(p.reads) or ("what its after-prefill stage computes" if p.stage else "nothing")
        lines = [f"{p.name}  (reads {reads}{'; attention-free' if p.attention_free else ''})"]
        for text in (p.summary, p.paper, "options: " + ", ".join(f"{k}={v!r}" for k, v in p.config_fields().items())):
            lines += textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False)
        blocks.append("\n".join(lines))
    print("\n\n".join(blocks))
    print(f"\n{len(policies)} policies; --set KEY=VALUE passes an option, --json shows each option's description.")
    intro = ("Storage codecs: how kept entries are stored (--codec NAME, codec=NAME in lm-eval); a budget in bytes "
             "buys entries at the codec's price, shown for an entry of 64 and 128 channels in bfloat16 (list "
             "--codecs --json: as data).")
    print("\n" + "\n".join(textwrap.wrap(intro, width)) + "\n\n" + codecs_text(list_codecs(), width))
    return 0


PRICED_AT = (64, 128)
"""Head sizes a codec's price per entry is shown for (in bfloat16): a small model's and a large one's."""


def codec_row(info) -> dict:
    """One codec as ``list --codecs --json`` shows it: what the budget needs to know to buy its entries."""
    import torch

    from kvpolicies.engine.codecs import GroupedCodec

    row = {"name": info.name, "plugin": info.plugin, "summary": info.summary}
    try:
        codec = info.codec_class()
        row["entry_bytes_bfloat16"] = {str(head_dim): codec.entry_bytes(head_dim, torch.bfloat16)
                                      for head_dim in PRICED_AT}
        row["lossless"] = codec.lossless
        grouped = isinstance(codec, GroupedCodec)
        row["group"] = codec.group if grouped else 1
        row["full_precision_newest"] = [codec.residual, codec.most_at_full_precision] if grouped else [0, 0]
        row["fitted_per_head"] = grouped and codec.fits
    except Exception as error:  # a broken plugin is named, not fatal
        row["error"] = f"{type(error).__name__}: {error}"
    return row


def codecs_text(codecs, width: int) -> str:
    """Each codec's name, price of an entry at ``head_dim`` 64 and 128 in bfloat16, and summary, wrapped."""
    import torch

    blocks = []
    for info in codecs:
        try:
            codec = info.codec_class()
            price = " / ".join(f"{codec.entry_bytes(head_dim, torch.bfloat16)} B" for head_dim in PRICED_AT)
        except Exception as error:  # a broken plugin is named, not fatal
            price = f"broken: {type(error).__name__}"
        lines = [f"{info.name}  ({price})"]
        lines += textwrap.wrap(info.summary, width, initial_indent="  ", subsequent_indent="    ")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from kvpolicies.engine.cache import CompressedCache
    from kvpolicies.integrations.models import load_model
    from kvpolicies.integrations.protocol import question_start, split_cache
    from kvpolicies.registry import get_codec, get_policy

    if (args.prompt is None) == (args.file is None):
        raise UsageError("give the prompt either as an argument or with --file, not both or neither")
    prompt = args.prompt if args.file is None else read_text_file(args.file, "prompt file")
    if not prompt.strip():
        raise UsageError(f"the prompt{'' if args.file is None else f' in {args.file}'} is empty; give some text")
    protocol = Protocol.parse(args.protocol)
    if args.question is not None and not args.question.strip():
        raise UsageError("--question is empty; give the question's text or leave --question out")
    if protocol is Protocol.QUERY_AGNOSTIC and args.question is None:
        raise UsageError("--protocol query_agnostic compresses the prompt before its question is seen: give the "
                         "question with --question")
    marker = None if args.question is None else "\n" + args.question
    prompt = prompt if marker is None else prompt + marker
    policy = get_policy(args.policy, **parse_options(args.set))
    budget = budget_of(args, slack_tokens=args.budget_slack, windows=args.budget_windows)
    codec = get_codec(args.codec)  # an unknown name fails before the model loads

    print(f"kvpolicies: loading {args.model or 'the embedded model'} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, **loading_of(args).given())
    if args.raw or not getattr(tokenizer, "chat_template", None):
        inputs = tokenizer(prompt, return_tensors="pt")
    else:
        messages = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    inputs = inputs.to(model.device)
    prompt_tokens = inputs["input_ids"].shape[1]
    cache = CompressedCache(model, policy, budget, codec=codec, tokenizer=tokenizer)
    print(f"kvpolicies: generating with {policy!r} at budget {budget} ...", file=sys.stderr)
    started = time.perf_counter()
    if marker is not None:
        ids = inputs["input_ids"]
        start = question_start(lambda part: tokenizer.decode(part), ids[0].tolist(), marker)
        if start is None:
            raise UsageError("the question cannot be found in the tokenized prompt (the chat template changed it); "
                             "try --raw")
        split_cache(model, cache, ids, [start], protocol, args.prefill_chunk)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            cache=cache,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            prefill_chunk_size=args.prefill_chunk,
        )
    seconds = time.perf_counter() - started
    new_tokens = output[0, prompt_tokens:]
    print(tokenizer.decode(new_tokens, skip_special_tokens=True))
    print()
    stats = cache.stats()
    rows = [
        ["policy", f"{policy.name} {json.dumps(policy.config.model_dump(mode='json'))}"],
        ["budget", f"{budget}" + (f" (compression ratio {budget.compression_ratio:g})"
                                  if budget.compression_ratio is not None else "")
                   + (f" (each head may grow {budget.slack_tokens} entries past it while generating "
                                   "before eviction runs again: --budget-slack 0 evicts at every step)"
                                   if budget.slack_tokens else "")
                   + (f"; sliding windows: {budget.windows} (--budget-windows)" if cache.shape.sliding_layers else "")],
        ["codec", f"{codec.name}: {cache.shape.kept_entry_bytes} bytes an entry, against "
                  f"{cache.shape.entry_bytes} at full precision"
                  + (f" (each head's newest {cache.shape.full_precision_entries} at most are held at full precision)"
                     if cache.shape.full_precision_entries else "")],
        ["tokens (prompt + generated)", f"{prompt_tokens} + {len(new_tokens)}"],
        ["KV entries kept / full", f"{stats.kept_entries:,} / {stats.full_entries:,} ({stats.kept_fraction:.1%})"],
        *([["protocol", f"{protocol.value}: the question and the generated tokens ({stats.appended_entries:,} "
                        f"entries) are kept whole; the prompt before it keeps "
                        f"{stats.kept_entries - stats.appended_entries:,}"]] if marker is not None else []),
        [
            "resident KV bytes / full",
            f"{stats.resident_bytes:,} / {stats.full_bytes:,} ({stats.resident_bytes / max(stats.full_bytes, 1):.1%})",
        ],
        ["wall time", f"{seconds:.2f} s"],
    ]
    print(tabulate(rows, tablefmt="plain"))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    import torch

    from kvpolicies.engine.cache import CompressedCache
    from kvpolicies.engine.policy import Policy
    from kvpolicies.integrations.models import load_model
    from kvpolicies.registry import get_codec, get_policy

    policy = get_policy(args.policy, **parse_options(args.set))
    budget = budget_of(args, slack_tokens=args.budget_slack, windows=args.budget_windows)
    codec = get_codec(args.codec)
    text = None if args.file is None else read_text_file(args.file, "prompt file")
    if text is not None and not text.strip():
        raise UsageError(f"the prompt in {args.file} is empty; give some text")
    print(f"kvpolicies: loading {args.model or 'the embedded model'} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, **loading_of(args).given())
    cache = CompressedCache(model, policy, budget, codec=codec, tokenizer=tokenizer)
    if args.file is None:
        tokens = cache.allocation(args.tokens).tokens
        seq_len = args.tokens
        heading = f"planned allocation for a {seq_len}-token sequence"
        if type(policy).reallocate_heads is not Policy.reallocate_heads:
            heading += " (before this policy moves entries between heads by score: use --file to measure)"
    else:
        inputs = tokenizer(text, return_tensors="pt").to(model.device)
        with torch.no_grad():
            model(**inputs, cache=cache)
        tokens = cache.kept_per_head()[:, 0]
        seq_len = inputs["input_ids"].shape[1]
        heading = f"entries kept after the prefill of {args.file} ({seq_len} tokens)"
    print(f"{policy.name} at budget {budget}: {heading}")
    print(allocation_table(tokens, seq_len, cache.shape))
    total = int(tokens.sum())
    full = cache.shape.full_entries(seq_len)  # the model's own cache: sliding layers hold their window
    print(
        f"total: {total:,} of {full:,} entries ({total / full:.1%}), "
        f"{round(cache.shape.most_bytes(total)):,} bytes of {full * cache.shape.entry_bytes:,}"
        + (" at most (each head's newest entries at full precision)" if cache.shape.full_precision_entries else "")
    )
    return 0


def allocation_table(tokens, seq_len: int, shape: CacheShape) -> str:
    """A layer × KV-head table of entries, with each layer's share of the most it can hold (a sliding-window layer,
    marked, is measured against its window's ``W - 1``, and a grouped codec's entries hidden there)."""
    heads = tokens.shape[1]
    rows = [[f"{layer} (window {shape.windows[layer]})" if layer in shape.sliding_layers else layer, *row.tolist(),
             f"{row.sum().item() / (heads * shape.held_whole(layer, seq_len)):.1%}"] for layer, row in enumerate(tokens)]
    return tabulate(rows, headers=["layer", *(f"head {h}" for h in range(heads)), "of full"], tablefmt="simple")


def run_head_scores(args: argparse.Namespace) -> int:
    from kvpolicies.experiments.head_scores import retrieval_scores, save_head_scores
    from kvpolicies.integrations.models import EMBEDDED_MODEL, load_model

    print(f"kvpolicies: loading {args.model or 'the embedded model'} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, **loading_of(args).given())
    print(f"kvpolicies: probing {args.samples} passkey prompts of ~{args.tokens} tokens ...", file=sys.stderr)
    scores = retrieval_scores(model, tokenizer, samples=args.samples, context_tokens=args.tokens, seed=args.seed)
    save_head_scores(
        args.output, scores, model=args.model or EMBEDDED_MODEL, samples=args.samples,
        context_tokens=args.tokens, seed=args.seed,
    )
    print(tabulate(
        [[layer, *(f"{v:.2f}" for v in row.tolist())] for layer, row in enumerate(scores)],
        headers=["layer", *(f"head {h}" for h in range(scores.shape[1]))], tablefmt="simple",
    ))
    print(f"wrote {args.output}")
    return 0
