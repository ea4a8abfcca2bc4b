"""Prefill and decode time of every policy relative to the full cache, on the embedded model at ~2k tokens.

    python benchmarks/policy_overhead.py [--tokens 2048] [--budget 0.25] [--decode 32] [--repeats 2]

Prints one table (stdout). Times are medians over repeats, measured in this process, after a warm-up run.
"Scoring" is the cost of the policy over the full cache's prefill: attention-based policies pay for q·Kᵀ on top of
SDPA; H2O also pays at every decoding step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from tabulate import tabulate

import kvpolicies
from kvpolicies import Budget, CompressedCache
from kvpolicies_evals.data import passkey_prompt


def measure(model, ids: torch.Tensor, make_cache, decode_steps: int) -> tuple[float, float, int]:
    """Seconds for the prefill, seconds per decoded token, resident bytes after decoding."""
    cache = make_cache()
    with torch.no_grad():
        started = time.perf_counter()
        out = model(ids, past_key_values=cache)
        prefill = time.perf_counter() - started
        token = out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(decode_steps):
            token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
        decode = (time.perf_counter() - started) / decode_steps
    return prefill, decode, cache.resident_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: the embedded model")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--budget", default="0.25")
    parser.add_argument("--decode", type=int, default=32, help="decoded tokens per run")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = kvpolicies.load_model(args.model)
    import random

    context, _, _ = passkey_prompt(random.Random(0), args.tokens * 2)
    ids = tokenizer(context, return_tensors="pt")["input_ids"][:, : args.tokens].to(model.device)
    budget = Budget.parse(args.budget)
    policies = [info.name for info in kvpolicies.list_policies()]
    print(f"kvpolicies: {len(policies)} policies x {args.repeats} repeats at {ids.shape[1]} tokens", file=sys.stderr)
    measure(model, ids, lambda: CompressedCache(model, "full", 1.0), 2)  # warm-up

    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in policies}
    for repeat in range(args.repeats):  # policies interleaved, so drift in machine speed hits all alike
        for name in policies:
            runs[name].append(measure(model, ids, lambda: CompressedCache(model, name, budget), args.decode))
        print(f"kvpolicies: repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    results = {
        name: (statistics.median(r[0] for r in got), statistics.median(r[1] for r in got), got[-1][2])
        for name, got in runs.items()
    }
    full_prefill, full_decode, full_bytes = results["full"]
    rows = []
    for name, (prefill, decode, resident) in results.items():
        needs = ", ".join(sorted(kvpolicies.get_policy(name).needs)) or "-"
        rows.append([
            name, needs, f"{prefill:.2f}", f"{prefill / full_prefill:.2f}x", f"{decode * 1000:.1f}",
            f"{decode / full_decode:.2f}x", f"{resident / 2**20:.1f}", f"{resident / full_bytes:.1%}",
        ])
    print(f"model: {args.model or 'embedded SmolLM2-135M-Instruct'}, device: {model.device}, dtype: {model.dtype}, "
          f"tokens: {ids.shape[1]}, budget: {budget}, decode: {args.decode} tokens, torch {torch.__version__}, "
          f"threads: {torch.get_num_threads()}")
    print(tabulate(rows, headers=["policy", "reads", "prefill s", "vs full", "decode ms/token", "vs full",
                                  "KV MiB", "of full"], tablefmt="github"))


if __name__ == "__main__":
    main()
