"""The ``kvpolicies`` command. Results go to stdout; progress and logs go to stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tabulate import tabulate

from kvpolicies.budget import Budget, BudgetError
from kvpolicies.policy import Policy, PolicyConfigError, coerce_option
from kvpolicies.registry import UnknownPolicyError, get_policy, list_policies


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

    listing = commands.add_parser("list", help="show the registered policies and their options")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=run_list)

    generate = commands.add_parser("generate", help="generate text with a compressed KV cache")
    generate.add_argument("prompt", nargs="?", help="the prompt (or use --file)")
    generate.add_argument("--file", type=Path, help="read the prompt from this file")
    add_policy_arguments(generate)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    generate.add_argument("--prefill-chunk", type=int, metavar="N",
                          help="prefill N tokens at a time, evicting after each chunk (memory follows the budget)")
    generate.set_defaults(run=run_generate)

    inspect = commands.add_parser("inspect", help="show how a policy spreads a budget over layers and KV heads")
    add_policy_arguments(inspect)
    inspect.add_argument("--tokens", type=int, default=2000, help="sequence length of the planned allocation")
    inspect.add_argument("--file", type=Path, help="run this prompt and show the entries actually kept per head")
    inspect.set_defaults(run=run_inspect)

    scores = commands.add_parser("head-scores", help="measure retrieval scores per KV head (for headkv static)")
    scores.add_argument("--model", help="model id, folder or .gguf file (default: the embedded model)")
    scores.add_argument("--output", type=Path, required=True, help="JSON file to write")
    scores.add_argument("--samples", type=int, default=8, help="passkey prompts to probe (default: 8)")
    scores.add_argument("--tokens", type=int, default=1000, help="approximate prompt length (default: 1000)")
    scores.add_argument("--seed", type=int, default=0)
    scores.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    scores.set_defaults(run=run_head_scores)

    commands.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness with the `kvpolicies` model registered (arguments as for lm_eval)",
        description="kvpolicies lm-eval --model kvpolicies --model_args policy=l2norm,budget=0.5 --tasks kvp_passkey "
        "--include_path evals/tasks --limit 10   (every argument goes to lm_eval unchanged)",
    )

    sweep = commands.add_parser("sweep", help="run policies x budgets x tasks x models, resumable, then rank them")
    sweep.add_argument("--config", type=Path, help="YAML or TOML grid (see docs/leaderboard.md)")
    sweep.add_argument("--quick", action="store_true", help="small grid: passkey at 2k tokens, 5 policies, 2 budgets")
    sweep.add_argument("--results", type=Path, help="results folder (default: results/quick or results/default)")
    sweep.add_argument("--policies", help="comma-separated policy names (default: every registered policy)")
    sweep.add_argument("--budgets", help="comma-separated budgets (default: 0.1,0.25,0.5,0.75)")
    sweep.add_argument("--tasks", help="comma-separated task names (default: kvp_passkey,kvp_niah,kvp_ppl)")
    sweep.add_argument("--models", help="comma-separated model ids/paths (default: the embedded model)")
    sweep.add_argument("--limit", type=int, help="samples per task (default: the task's whole data)")
    sweep.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    sweep.set_defaults(run=run_sweep_command)

    board = commands.add_parser("leaderboard", help="render saved sweep results as tables and plots (no model)")
    board.add_argument("results", type=Path, help="results folder of a sweep")
    board.add_argument("--format", choices=["terminal", "markdown", "csv", "html"], default="terminal")
    board.add_argument("--output", type=Path, help="write the tables here instead of stdout")
    board.add_argument("--plots", type=Path, help="write PNG figures into this folder")
    board.add_argument("--provenance", action="store_true", help="start with dates, versions, devices and the grid")
    board.set_defaults(run=run_leaderboard)

    analyze = commands.add_parser("analyze", help="measurements behind the policies (norms vs attention)")
    analyses = analyze.add_subparsers(required=True, metavar="ANALYSIS")
    norms = analyses.add_parser("norms", help="correlation of key L2 norms with the attention keys receive")
    norms.add_argument("--model", help="model id, folder or .gguf file (default: the embedded model)")
    source = norms.add_mutually_exclusive_group()
    source.add_argument("--text", type=Path, help="text file to run (default: the first kvp_niah prompt at 2k tokens)")
    source.add_argument("--task", choices=["kvp_passkey", "kvp_niah", "kvp_ppl"], help="first sample of this task")
    norms.add_argument("--tokens", type=int, default=2048, help="prompt length when taken from a task")
    norms.add_argument("--window", type=int, default=64, help="last queries whose attention is measured")
    norms.add_argument("--keep", type=float, default=0.5, help="fraction for the top-k overlap")
    norms.add_argument("--layers", default="0,1,15,29", help="layers for the scatter plots")
    norms.add_argument("--out", type=Path, default=Path("results/analysis"), help="folder for the PNG figures")
    norms.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    norms.set_defaults(run=run_analyze_norms)

    bench = commands.add_parser("bench", help="memory and speed of every policy vs the full cache and the physical limit")
    bench_model = bench.add_mutually_exclusive_group()
    bench_model.add_argument("--model", help="model id, folder or .gguf file (default: the embedded model)")
    bench_model.add_argument("--random-model", metavar="SHAPE[:LAYERS]",
                             help="random weights of a real architecture, e.g. llama3-8b:2 (prompt: random ids)")
    bench.add_argument("--contexts", default="1024,2048,4096,8192", help="comma-separated prompt lengths in tokens")
    bench.add_argument("--policies", help="comma-separated policy names (default: every registered policy)")
    bench.add_argument("--budgets", default="0.5,0.25,0.1", help="comma-separated budgets")
    bench.add_argument("--decode", type=int, default=32, help="decoded tokens per run (default: 32)")
    bench.add_argument("--repeats", type=int, default=3, help="interleaved runs per cell, medians reported")
    bench.add_argument("--prefill-chunk", type=int, metavar="N", help="prefill N tokens at a time, evicting between")
    bench.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    bench.add_argument("--dtype", help="float32, bfloat16, ... (default: bfloat16 on CUDA, float32 on CPU)")
    bench.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    bench.set_defaults(run=run_bench)

    report = commands.add_parser("report", help="regenerate a documentation page from (and, if missing, by running) "
                                 "sweeps and benchmarks")
    pages = report.add_subparsers(required=True, metavar="PAGE")
    catalogue = pages.add_parser("policies", help="docs/policies.md: every policy's paper, cost and scores vs random")
    catalogue.add_argument("--results", type=Path, default=Path("results/default"),
                           help="sweep results folder, shared with the default sweep (default: results/default)")
    catalogue.add_argument("--bench-json", type=Path, default=Path("results/bench-2k.json"),
                           help="benchmark measurements; measured at 2048 tokens if the file is missing")
    catalogue.add_argument("--no-run", action="store_true", help="render from what is saved; run nothing")
    catalogue.add_argument("--output", type=Path, help="write the page here instead of stdout")
    catalogue.set_defaults(run=run_report_policies)
    paper = pages.add_parser("paper", help="docs/paper-replication.md: the L2-norm paper's claims measured here")
    paper.add_argument("--model", help="model id, folder or .gguf file (default: the embedded model)")
    paper.add_argument("--results", type=Path, default=Path("results/default"),
                       help="sweep results folder, shared with the default sweep (default: results/default)")
    paper.add_argument("--plots", type=Path, default=Path("docs/paper-replication"), help="folder for the figures")
    paper.add_argument("--bench-json", type=Path, default=Path("results/bench-replication.json"),
                       help="benchmark measurements; measured at 2048 tokens if the file is missing")
    paper.add_argument("--no-run", action="store_true", help="run no sweep cell or benchmark; render what is saved")
    paper.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    paper.add_argument("--output", type=Path, help="write the page here instead of stdout")
    paper.set_defaults(run=run_report_paper)

    data = commands.add_parser("eval-data", help="write the offline evaluation sets (passkey, niah, ppl) as JSONL")
    data.add_argument("--out", type=Path, required=True, help="folder for kvp_passkey.jsonl, kvp_niah.jsonl, ...")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--lengths", help="comma-separated token lengths (default: each task's own)")
    data.set_defaults(run=run_eval_data)
    return parser


def sweep_config(args: argparse.Namespace):
    from kvpolicies.sweep import QUICK, SweepConfig, TaskSpec

    if args.config and args.quick:
        raise PolicyConfigError("use either --config or --quick")
    config = SweepConfig.load(args.config) if args.config else (QUICK.model_copy(deep=True) if args.quick else SweepConfig())
    updates: dict[str, Any] = {}
    if args.policies:
        updates["policies"] = [name.strip() for name in args.policies.split(",")]
    if args.budgets:
        updates["budgets"] = [text.strip() for text in args.budgets.split(",")]
    if args.tasks:
        known = {task.name: task for task in config.tasks}
        updates["tasks"] = [known.get(name.strip(), TaskSpec(name=name.strip())) for name in args.tasks.split(",")]
    if args.models:
        updates["models"] = [name.strip() for name in args.models.split(",")]
    config = SweepConfig.model_validate(config.model_dump() | updates)
    if args.limit:
        config.tasks = [task.model_copy(update={"limit": args.limit}) for task in config.tasks]
    for spec in config.resolved_policies():
        get_policy(spec.name, **spec.options)  # fail before running anything
    return config


def run_sweep_command(args: argparse.Namespace) -> int:
    from kvpolicies.leaderboard import plot, render
    from kvpolicies.sweep import run_sweep

    config = sweep_config(args)
    results = args.results or Path("results") / ("quick" if args.quick else "default")
    failed = sum(record["status"] != "ok" for record in run_sweep(config, results))
    print(render(results))
    if not args.no_plots:
        for path in plot(results, results / "plots"):
            print(f"plot: {path}")
    return 1 if failed else 0


def run_leaderboard(args: argparse.Namespace) -> int:
    from kvpolicies.leaderboard import plot, render

    if not args.results.is_dir():
        raise FileNotFoundError(f"results folder {args.results} does not exist; run `kvpolicies sweep` first")
    images = []
    if args.plots:
        for path in plot(args.results, args.plots):
            print(f"plot: {path}", file=sys.stderr)
            base = args.output.parent if args.output else Path.cwd()
            images.append(os.path.relpath(path, base))
    text = render(args.results, args.format, with_provenance=args.provenance, images=images)
    if args.output:
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


def run_analyze_norms(args: argparse.Namespace) -> int:
    from kvpolicies.analysis import norm_attention, plot_norm_attention, summary_rows
    from kvpolicies.models import load_model

    print(f"kvpolicies: loading {args.model or 'the embedded model'} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=args.device, dtype="float32")
    if args.text:
        text = args.text.read_text()
    else:
        from kvpolicies_evals.data import GENERATORS

        task = args.task or "kvp_niah"
        options = {"lengths": [args.tokens]} | ({"per_length": 1} if task == "kvp_ppl" else {"per_cell": 1})
        first = GENERATORS[task](**options)[0]
        text = first.get("prompt", first.get("text"))
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    result = norm_attention(model, ids, window=args.window, keep_fraction=args.keep)
    heads = result.spearman.shape[1]
    print(f"key norm vs attention from the last {args.window} queries, {result.tokens} tokens "
          f"(negative rho = low norm, high attention, as the L2-norm paper claims)")
    print(tabulate(summary_rows(result), tablefmt="simple", headers=[
        "layer", *(f"rho head {h}" for h in range(heads)), "pearson (mean)", f"top-{args.keep:g} overlap"]))
    negative = int((result.spearman < 0).sum())
    print(f"Spearman rho < 0 in {negative} of {result.spearman.numel()} layer x head cells; "
          f"mean rho {result.spearman.mean():+.3f}; mean overlap {result.overlap.mean():.3f} "
          f"(chance: {args.keep:g})")
    layers = [int(x) % result.spearman.shape[0] for x in args.layers.split(",")]
    for path in plot_norm_attention(result, args.out, layers):
        print(f"plot: {path}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    import platform

    import torch
    import transformers

    from kvpolicies.bench import run_benchmark, tables
    from kvpolicies.models import load_model

    policies = [name.strip() for name in args.policies.split(",")] if args.policies else [
        info.name for info in list_policies()
    ]
    budgets = [Budget.parse(text.strip()) for text in args.budgets.split(",")]
    for name in policies:
        get_policy(name)  # fail before loading anything
    contexts = [int(text) for text in args.contexts.split(",")]
    if args.random_model:
        from kvpolicies.models import random_model

        model, tokenizer = random_model(args.random_model, device=args.device, dtype=args.dtype), None
    else:
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    progress = lambda message: print(f"kvpolicies bench: {message}", file=sys.stderr)  # noqa: E731
    results = run_benchmark(model, tokenizer, contexts, policies, budgets, args.decode, args.repeats,
                            args.prefill_chunk, progress)
    device = str(model.device) + (f" ({torch.cuda.get_device_name(model.device)})" if model.device.type == "cuda" else
                                  f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    name = f"random-weight {args.random_model}" if args.random_model else args.model or "embedded SmolLM2-135M-Instruct"
    header = (f"model: {name}, device: {device}, dtype: {model.dtype}, "
              f"attention: {model.config._attn_implementation}, torch {torch.__version__}, transformers "
              f"{transformers.__version__}, decode: {args.decode} tokens, medians of {args.repeats}, prefill chunk: "
              f"{args.prefill_chunk or 'none'}")
    print(header + "\n\n" + tables(results))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": [r.as_dict() for r in results]}, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def run_report_policies(args: argparse.Namespace) -> int:
    from kvpolicies.reports import catalogue_sweep, policies_page

    if not args.no_run:
        from kvpolicies.sweep import run_sweep

        failed = sum(record["status"] != "ok" for record in run_sweep(catalogue_sweep(), args.results))
        if failed:
            print(f"kvpolicies: {failed} cells failed; the page shows them as missing", file=sys.stderr)
        if not args.bench_json.exists():
            args.bench_json.parent.mkdir(parents=True, exist_ok=True)
            bench_args = build_parser().parse_args(
                ["bench", "--contexts", "2048", "--budgets", "0.25", "--json", str(args.bench_json)]
            )
            run_bench(bench_args)
    text = policies_page(args.results, args.bench_json)
    if args.output:
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


def run_report_paper(args: argparse.Namespace) -> int:
    from kvpolicies.replication import replicate

    text = replicate(args.results, args.plots, args.output, model=args.model, run=not args.no_run,
                     bench_json=args.bench_json, device=args.device,
                     progress=lambda message: print(f"kvpolicies: {message}", file=sys.stderr))
    if args.output:
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


def run_eval_data(args: argparse.Namespace) -> int:
    from kvpolicies_evals.data import GENERATORS, write_jsonl

    for task, generate in GENERATORS.items():
        options = {"seed": args.seed}
        if args.lengths:
            options["lengths"] = [int(n) for n in args.lengths.split(",")]
        rows = generate(**options)
        path = write_jsonl(args.out / f"{task}.jsonl", rows)
        print(f"{path}: {len(rows)} samples")
    return 0


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


def run_list(args: argparse.Namespace) -> int:
    policies = list_policies()
    if args.json:
        rows = [
            {
                "name": p.name,
                "plugin": p.plugin,
                "summary": p.summary,
                "paper": p.paper,
                "needs": sorted(p.needs),
                "attention_free": p.attention_free,
                "options": p.policy_class.Config.model_json_schema()["properties"],
            }
            for p in policies
        ]
        print(json.dumps(rows, indent=2, default=str))
        return 0
    rows = [
        [
            p.name,
            (", ".join(sorted(p.needs)) or "nothing") + ("\n(attention-free)" if p.attention_free else ""),
            f"{p.summary}\n{p.paper}",
            "\n".join(f"{key}={value!r}" for key, value in p.config_fields().items()),
        ]
        for p in policies
    ]
    print(tabulate(rows, headers=["policy", "reads", "what it keeps / paper", "options (defaults)"],
                   tablefmt="simple_grid", maxcolwidths=[None, 24, 80, None]))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from kvpolicies.cache import CompressedCache
    from kvpolicies.models import load_model

    if (args.prompt is None) == (args.file is None):
        raise PolicyConfigError("give the prompt either as an argument or with --file, not both or neither")
    prompt = args.prompt if args.file is None else args.file.read_text()
    policy = get_policy(args.policy, **parse_options(args.set))
    budget = Budget.parse(args.budget)

    print(f"kvpolicies: loading {args.model or 'the embedded model'} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.raw or not getattr(tokenizer, "chat_template", None):
        inputs = tokenizer(prompt, return_tensors="pt")
    else:
        messages = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    inputs = inputs.to(model.device)
    prompt_tokens = inputs["input_ids"].shape[1]
    cache = CompressedCache(model, policy, budget)
    print(f"kvpolicies: generating with {policy!r} at budget {budget} ...", file=sys.stderr)
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            **inputs,
            past_key_values=cache,
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
        ["budget", str(budget)],
        ["tokens (prompt + generated)", f"{prompt_tokens} + {len(new_tokens)}"],
        ["KV entries kept / full", f"{stats.kept_entries:,} / {stats.full_entries:,} ({stats.kept_fraction:.1%})"],
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

    from kvpolicies.cache import CompressedCache
    from kvpolicies.models import load_model

    policy = get_policy(args.policy, **parse_options(args.set))
    budget = Budget.parse(args.budget)
    print(f"kvpolicies: loading {args.model or 'the embedded model'} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    cache = CompressedCache(model, policy, budget)
    if args.file is None:
        tokens = cache.allocation(args.tokens).tokens
        seq_len = args.tokens
        heading = f"planned allocation for a {seq_len}-token sequence"
        if type(policy).reallocate_heads is not Policy.reallocate_heads:
            heading += " (before this policy moves entries between heads by score: use --file to measure)"
    else:
        inputs = tokenizer(args.file.read_text(), return_tensors="pt").to(model.device)
        with torch.no_grad():
            model(**inputs, past_key_values=cache)
        tokens = cache.kept_per_head()[:, 0]
        seq_len = inputs["input_ids"].shape[1]
        heading = f"entries kept after the prefill of {args.file} ({seq_len} tokens)"
    print(f"{policy.name} at budget {budget}: {heading}")
    print(allocation_table(tokens, seq_len))
    total = int(tokens.sum())
    full = seq_len * tokens.numel()
    print(
        f"total: {total:,} of {full:,} entries ({total / full:.1%}), "
        f"{total * cache.shape.entry_bytes:,} bytes of {full * cache.shape.entry_bytes:,}"
    )
    return 0


def allocation_table(tokens, seq_len: int) -> str:
    """A layer × KV-head table of entries, with each layer's share of the full cache."""
    heads = tokens.shape[1]
    rows = [[layer, *row.tolist(), f"{row.sum().item() / (heads * seq_len):.1%}"] for layer, row in enumerate(tokens)]
    return tabulate(rows, headers=["layer", *(f"head {h}" for h in range(heads)), "of full"], tablefmt="simple")


def run_head_scores(args: argparse.Namespace) -> int:
    from kvpolicies.head_scores import retrieval_scores, save_head_scores
    from kvpolicies.models import load_model

    print(f"kvpolicies: loading {args.model or 'the embedded model'} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=args.device)
    print(f"kvpolicies: probing {args.samples} passkey prompts of ~{args.tokens} tokens ...", file=sys.stderr)
    scores = retrieval_scores(model, tokenizer, samples=args.samples, context_tokens=args.tokens, seed=args.seed)
    save_head_scores(
        args.output, scores, model=args.model or "smollm2-135m-instruct", samples=args.samples,
        context_tokens=args.tokens, seed=args.seed,
    )
    print(tabulate(
        [[layer, *(f"{v:.2f}" for v in row.tolist())] for layer, row in enumerate(scores)],
        headers=["layer", *(f"head {h}" for h in range(scores.shape[1]))], tablefmt="simple",
    ))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
