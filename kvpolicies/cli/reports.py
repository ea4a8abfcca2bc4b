"""`kvpolicies analyze | bench | report | eval-data`: measurements and generated pages."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvpolicies_evals.data import GENERATORS
from tabulate import tabulate

from kvpolicies.cli.options import (
    comma_separated,
    fraction,
    path,
    positive_int,
    read_text_file,
    whole_number,
    whole_numbers,
    write_or_print,
)
from kvpolicies.errors import UsageError
from kvpolicies.integrations.loading import EXTRAS, add_loading_arguments, loading_of

BENCH_TIMING: dict[str, object] = {"policies": None, "budgets": ["0.5", "0.25", "0.1"], "compression_ratios": None,
                                   "decode": 32, "repeats": 3, "prefill_chunk": None, "batch": 1, "json": None}
"""The timing run's flags and their defaults: ``bench``'s other modes read some of them, and refuse the rest."""
BENCH_MODE_READS: dict[str, tuple[str, ...]] = {
    "from_json": (),
    "codec_error": ("json",),
    "step_costs": ("policies", "budgets", "compression_ratios"),
    "profile": ("policies", "budgets", "compression_ratios", "decode", "prefill_chunk"),
}
"""Which of :data:`BENCH_TIMING` each of ``bench``'s other modes reads."""


def add_commands(commands) -> None:
    analyze = commands.add_parser("analyze", help="measurements behind the policies (norms vs attention)")
    analyses = analyze.add_subparsers(required=True, metavar="ANALYSIS")
    norms = analyses.add_parser("norms", help="correlation of key L2 norms with the attention keys receive")
    norms.add_argument("--model", help="model id, folder or .gguf file (default: the embedded model)")
    source = norms.add_mutually_exclusive_group()
    source.add_argument("--text", type=path, help="text file to run (default: the first kvp_niah prompt at 2k tokens)")
    source.add_argument("--task", choices=sorted(GENERATORS), help="first sample of this task")
    norms.add_argument("--tokens", type=positive_int, default=2048, help="prompt length when taken from a task")
    norms.add_argument("--window", type=positive_int, default=64, help="last queries whose attention is measured")
    norms.add_argument("--keep", type=fraction, default=0.5, help="fraction for the top-k overlap")
    norms.add_argument("--layers", type=whole_numbers(0), default=[0, 1, 15, 29], help="layers for the scatter plots")
    norms.add_argument("--out", type=path, default=Path("results/analysis"), help="folder for the PNG figures")
    norms.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    norms.set_defaults(run=run_analyze_norms)

    bench = commands.add_parser("bench", help="memory and speed of every policy vs the full cache and the physical limit")
    bench_model = bench.add_mutually_exclusive_group()
    bench_model.add_argument("--model", help="model id, folder or .gguf file (default: the embedded model)")
    bench_model.add_argument("--random-model", metavar="SHAPE[:LAYERS]",
                             help="random weights of a real architecture, e.g. llama3-8b:2 (prompt: random ids)")
    bench.add_argument("--contexts", type=whole_numbers(1), default=[1024, 2048, 4096, 8192], help="comma-separated prompt lengths in tokens")
    bench.add_argument("--policies", type=comma_separated("policy names"),
                       help="comma-separated policy names (default: every registered policy)")
    budgets = bench.add_mutually_exclusive_group()
    budgets.add_argument("--budgets", type=comma_separated("budgets"), default=BENCH_TIMING["budgets"],
                         help="comma-separated budgets, the kept fraction (default: 0.5,0.25,0.1)")
    budgets.add_argument("--compression-ratios", type=comma_separated("compression ratios"), metavar="RATIOS",
                         help="kvpress's convention instead of --budgets: the fractions removed (0.75 = budget 0.25)")
    bench.add_argument("--decode", type=positive_int, default=BENCH_TIMING["decode"],
                       help="decoded tokens per run (default: 32)")
    bench.add_argument("--repeats", type=positive_int, default=BENCH_TIMING["repeats"],
                       help="interleaved runs per cell, medians reported")
    bench.add_argument("--prefill-chunk", type=whole_number(2), metavar="N",
                       help="prefill N >= 2 tokens at a time, evicting between")
    bench.add_argument("--codec", default="full",
                       help="how the policies store kept entries: full, int8, int4, ... (the full cache, the "
                            "reference, stays at full precision; default: full)")
    bench.add_argument("--batch", type=positive_int, default=BENCH_TIMING["batch"],
                       help="decode N copies of the prompt together, row b left-padded (ragged layers everywhere)")
    bench.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    bench.add_argument("--dtype", help="float32, bfloat16, ... (default: bfloat16 on CUDA, float32 on CPU)")
    add_loading_arguments(bench, device_and_dtype=False)
    bench.add_argument("--json", type=path, help="also write every measurement to this JSON file")
    modes = bench.add_mutually_exclusive_group()
    modes.add_argument("--profile", action="store_true",
                       help="instead of the tables: where each run's time goes (torch profiler, top operators)")
    modes.add_argument("--step-costs", action="store_true",
                       help="instead of the tables: kernel launches and host-device syncs per decoding step, counted "
                            "(not timed) at batch 1, 4 and 16, as a GPU would pay them, at the first context")
    modes.add_argument("--codec-error", action="store_true",
                       help="instead of the tables: how far each codec's stored keys, values and last-query "
                            "attention output are from the model's own at each context (--codec NAME: that codec "
                            "only; default: every lossy one), next to transformers' QuantizedCache when "
                            "optimum-quanto is installed")
    modes.add_argument("--from-json", type=path, nargs="+", metavar="JSON",
                       help="measure nothing: print the tables of saved --json files (e.g. one run per context)")
    bench.set_defaults(run=run_bench)

    report = commands.add_parser("report", help="regenerate a documentation page from (and, if missing, by running) "
                                 "sweeps and benchmarks")
    pages = report.add_subparsers(required=True, metavar="PAGE")
    catalogue = pages.add_parser("policies", help="docs/policies.md: every policy's paper, cost and scores vs random")
    catalogue.add_argument("--results", type=path, default=Path("results/default"),
                           help="sweep results folder, shared with the default sweep (default: results/default)")
    catalogue.add_argument("--bench-json", type=path, default=Path("results/bench-2k.json"),
                           help="benchmark measurements; measured at 2048 tokens if the file is missing")
    catalogue.add_argument("--no-run", action="store_true", help="render from what is saved; run nothing")
    catalogue.add_argument("--output", type=path, help="write the page here instead of stdout")
    catalogue.set_defaults(run=run_report_policies)
    paper = pages.add_parser("paper", help="docs/paper-replication.md: the L2-norm paper's claims measured here")
    paper.add_argument("--model", help="model id, folder or .gguf file (default: the embedded model)")
    paper.add_argument("--results", type=path, default=Path("results/default"),
                       help="sweep results folder, shared with the default sweep (default: results/default)")
    paper.add_argument("--plots", type=path, default=Path("docs/paper-replication"), help="folder for the figures")
    paper.add_argument("--bench-json", type=path, default=Path("results/bench-2k.json"),
                       help="benchmark measurements; measured at 2048 tokens if the file is missing")
    paper.add_argument("--no-run", action="store_true", help="run no sweep cell or benchmark; render what is saved")
    paper.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    paper.add_argument("--output", type=path, help="write the page here instead of stdout")
    paper.set_defaults(run=run_report_paper)

    anchors = pages.add_parser("anchors", help="docs/kvpress-anchors.md: our policies next to kvpress's reference "
                               "measurements on a natural-text passkey")
    anchors.add_argument("--model", help="model id, folder or .gguf file (default: the embedded model)")
    anchors.add_argument("--results", type=path, default=Path("results/anchors"),
                         help="sweep results folder (default: results/anchors)")
    anchors.add_argument("--no-run", action="store_true", help="render from what is saved; run nothing")
    anchors.add_argument("--output", type=path, help="write the page here instead of stdout")
    anchors.set_defaults(run=run_report_anchors)

    data = commands.add_parser("eval-data", help="write the offline evaluation sets (passkey, niah, ppl) as JSONL")
    data.add_argument("--out", type=path, required=True, help="folder for kvp_passkey.jsonl, kvp_niah.jsonl, ...")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--lengths", type=whole_numbers(1), help="comma-separated token lengths (default: each task's own)")
    data.set_defaults(run=run_eval_data)


def run_analyze_norms(args: argparse.Namespace) -> int:
    from kvpolicies.experiments.analysis import (
        norm_attention,
        plot_norm_attention,
        summary_rows,
    )
    from kvpolicies.integrations.models import load_model

    print(f"kvpolicies: loading {args.model or 'the embedded model'} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=args.device, dtype="float32")
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    if outside := [layer for layer in args.layers if layer >= num_layers]:  # before the measurement, not after
        raise UsageError(f"--layers {outside}: the model has layers 0 to {num_layers - 1}")
    if args.text:
        text = read_text_file(args.text, "text file")
    else:
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
    layers = args.layers
    for path in plot_norm_attention(result, args.out, layers):
        print(f"plot: {path}", file=sys.stderr)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from kvpolicies.experiments.bench import benchmark, load, profiles, tables

    _refuse_unread(args)
    if args.from_json:
        headers, results = load(args.from_json)
        print("\n".join(headers) + "\n\n" + tables(results))
        return 0
    loading = loading_of(args, EXTRAS).given()  # device and dtype are bench's own flags
    if args.compression_ratios is not None:
        from kvpolicies.engine.budget import Budget

        args.budgets = [Budget.from_compression_ratio(ratio) for ratio in args.compression_ratios]
    if args.step_costs:
        from kvpolicies.experiments.bench import _checked, _load
        from kvpolicies.experiments.step_costs import step_costs

        policies, budgets = _checked(args.policies, args.budgets)
        model, tokenizer = _load(args.model, args.device, args.dtype, args.random_model, loading)
        print(step_costs(model, tokenizer, args.contexts[0], policies, budgets, codec=args.codec))
        return 0
    if args.codec_error:
        return _codec_error(args, loading)
    if args.profile:
        print(profiles(args.model, args.contexts, args.policies, args.budgets, args.decode, args.prefill_chunk,
                       args.device, args.dtype, args.random_model, codec=args.codec, loading=loading))
        return 0
    header, results = benchmark(
        args.model, args.contexts, args.policies, args.budgets, args.decode, args.repeats, args.prefill_chunk,
        args.device, args.dtype, args.random_model, args.json,
        progress=lambda message: print(f"kvpolicies bench: {message}", file=sys.stderr), batch=args.batch,
        codec=args.codec, loading=loading,
    )
    print(header + "\n\n" + tables(results))
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _refuse_unread(args: argparse.Namespace) -> None:
    """A timing flag that the chosen mode does not read is refused: run as asked but without it, the output would
    look like an answer to a question that was not put."""
    mode = next((name for name in BENCH_MODE_READS if getattr(args, name)), None)
    if mode is None:
        return
    unread = [name for name, default in BENCH_TIMING.items()
              if name not in BENCH_MODE_READS[mode] and getattr(args, name) != default]
    if unread:
        flags = ", ".join("--" + name.replace("_", "-") for name in unread)
        reads = ", ".join("--" + name.replace("_", "-") for name in BENCH_MODE_READS[mode]) or "none of them"
        raise UsageError(f"--{mode.replace('_', '-')} does not read {flags}, so it would run as if not given; "
                         f"drop {'it' if len(unread) == 1 else 'them'} (of the timing run's flags it reads {reads})")


def _codec_error(args: argparse.Namespace, loading: dict) -> int:
    from kvpolicies.experiments.codec_error import measure, table

    header, rows = measure(args.model, args.contexts, None if args.codec == "full" else [args.codec], args.device,
                           args.dtype, args.random_model, loading, args.json,
                           progress=lambda message: print(f"kvpolicies bench: {message}", file=sys.stderr))
    print(header + "\n\n" + table(rows))
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def run_report_policies(args: argparse.Namespace) -> int:
    from kvpolicies.reports.catalogue import catalogue_sweep, policies_page

    if not args.no_run:
        from kvpolicies.experiments.sweep import run_sweep

        failed = sum(record.status != "ok" for record in run_sweep(catalogue_sweep(), args.results))
        if failed:
            print(f"kvpolicies: {failed} cells failed; the page shows them as missing", file=sys.stderr)
        if not args.bench_json.exists():
            from kvpolicies.experiments.bench import benchmark

            benchmark(json_path=args.bench_json, progress=lambda message: print(f"kvpolicies bench: {message}",
                                                                                  file=sys.stderr))
    text = policies_page(args.results, args.bench_json)
    write_or_print(text, args.output)
    return 0


def run_report_paper(args: argparse.Namespace) -> int:
    from kvpolicies.reports.replication import replicate

    text = replicate(args.results, args.plots, args.output, model=args.model, run=not args.no_run,
                     bench_json=args.bench_json, device=args.device,
                     progress=lambda message: print(f"kvpolicies: {message}", file=sys.stderr))
    write_or_print(text, args.output)
    return 0


def run_report_anchors(args: argparse.Namespace) -> int:
    from kvpolicies.reports.anchors import compare

    text = compare(args.results, model=args.model, run=not args.no_run,
                   progress=lambda message: print(f"kvpolicies: {message}", file=sys.stderr))
    write_or_print(text, args.output)
    return 0


def run_eval_data(args: argparse.Namespace) -> int:
    from kvpolicies_evals.data import write_jsonl

    for task, generate in GENERATORS.items():
        options = {"seed": args.seed}
        if args.lengths:
            options["lengths"] = args.lengths
        rows = generate(**options)
        path = write_jsonl(args.out / f"{task}.jsonl", rows)
        print(f"{path}: {len(rows)} samples")
    return 0
