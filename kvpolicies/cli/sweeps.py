"""`kvpolicies sweep | leaderboard`: grids of cells and their rankings."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvpolicies.cli.options import comma_separated, path, positive_number, text, whole_number, write_or_print
from kvpolicies.errors import UsageError
from kvpolicies.integrations.loading import add_loading_arguments, loading_of

if TYPE_CHECKING:
    from kvpolicies.experiments.results import ResultRecord

GRID_HELP = "see README.md, 'Sweeps and leaderboards'"


def add_commands(commands) -> None:
    sweep = commands.add_parser("sweep", help="run policies x budgets x tasks x models, resumable, then rank them",
                                description=f"Run a grid of cells, resumable, then rank them ({GRID_HELP}). The full "
                                "cache is always part of the grid, as the reference of every budget.")
    sweep.add_argument("--config", type=path, help=f"YAML or TOML grid ({GRID_HELP})")
    sweep.add_argument("--quick", action="store_true",
                       help="small grid: passkey at 2k tokens, 4 policies (l2norm, random, streaming, snapkv) and the "
                            "full cache, 2 budgets")
    sweep.add_argument("--preset", help=f"a grid shipped with kvpolicies ({', '.join(presets())}; "
                                        "README.md, 'RULER leaderboard')")
    sweep.add_argument("--results", type=path,
                       help="results folder (default: results/quick, results/PRESET or results/default)")
    sweep.add_argument("--policies", type=comma_separated("policy names"),
                       help="comma-separated policy names (default: every registered policy)")
    budgets = sweep.add_mutually_exclusive_group()
    budgets.add_argument("--budgets", type=comma_separated("budgets"),
                         help="comma-separated budgets, the kept fraction (default: 0.1,0.25,0.5,0.75)")
    budgets.add_argument("--compression-ratios", type=comma_separated("compression ratios"), metavar="RATIOS",
                         help="kvpress's convention instead of --budgets: the fractions removed, e.g. "
                              "0.25,0.5,0.75,0.875 (= --budgets 0.75,0.5,0.25,0.125)")
    sweep.add_argument("--tasks", type=comma_separated("task names"),
                       help="comma-separated task names (default: kvp_passkey,kvp_niah,kvp_ppl); they replace the "
                            "grid's tasks, its full-cache-only tasks included")
    sweep.add_argument("--models", type=comma_separated("models"),
                       help="comma-separated model ids/paths (default: the embedded model)")
    sweep.add_argument("--protocols", type=comma_separated("protocols"),
                       help="comma-separated: query_aware (default), query_agnostic or both, for every policy (a "
                            "grid's per-policy protocols included); the tasks must name their question for "
                            "query_agnostic")
    sweep.add_argument("--codec", type=text("a codec name"),
                       help="how every evicting policy stores its kept entries: full, int8, int4, ... (see "
                            "`kvpolicies list`; the full cache, the reference, stays at full precision)")
    loading = sweep.add_argument_group("how the models load (a grid file's loading: section; dtype and revision "
                                       "are part of each cell's key)")
    add_loading_arguments(loading)
    sweep.add_argument("--limit", type=int, help="samples per task, at least 1 (default: the task's whole data)")
    sweep.add_argument("--prefill-chunk", type=whole_number(2), metavar="N",
                       help="prefill prompts N tokens at a time, evicting between chunks: memory follows the budget "
                            "(part of each cell's key; --dry-run says which N fits the device)")
    sweep.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    sweep.add_argument("--no-shared-prefill", action="store_true",
                       help="prefill every prompt once per cell, not once for all the cells of a task (the records "
                            "are the same; sharing is faster, and holds one prompt's full prefill in memory)")
    sweep.add_argument("--decode-alone", action="store_true",
                       help="with a shared prefill, decode each cell's answers on its own, not the cells of a prompt "
                            "as one batch: each record is then bit for bit what the cell writes alone (batched, a "
                            "near-tie between two tokens may go the other way; docs/performance.md says how often)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="run nothing, load no model: the cells, samples, and per cell an estimate of peak memory "
                            "and time on this device, with the prefill chunk that fits")
    sweep.add_argument("--memory", type=positive_number, metavar="GIB",
                       help="with --dry-run: the memory to fit in, GiB (default: this GPU's, or this machine's RAM)")
    cluster = sweep.add_argument_group("where cells run (README.md, 'Sweeps on a Ray cluster')")
    cluster.add_argument("--executor", choices=["local", "ray"],
                         help="local: one cell after another in this process (default); ray: each cell on a Ray "
                              "worker (pip install 'kvpolicies[ray]')")
    cluster.add_argument("--address", type=text("a cluster address"), help="Ray cluster to join: auto (the one `ray start` made here) or HOST:PORT "
                                           "(default: start Ray on this machine for the sweep)")
    cluster.add_argument("--cpus-per-cell", type=float, metavar="N",
                         help="CPUs each Ray worker reserves, and its torch threads (default 1)")
    cluster.add_argument("--gpus-per-cell", type=float, metavar="N",
                         help="GPUs each Ray worker reserves (default 0; 0.5 puts two workers on a GPU)")
    cluster.add_argument("--max-retries", type=int, metavar="N",
                         help="runs of a cell whose Ray worker died before it is recorded as failed (default 2)")
    sweep.set_defaults(run=run_sweep_command)

    board = commands.add_parser("leaderboard", help="render saved sweep results as tables and plots (no model)")
    board.add_argument("results", type=path, help="results folder of a sweep")
    board.add_argument("--format", choices=["terminal", "markdown", "csv", "html"], default="terminal")
    board.add_argument("--output", type=path, help="write the tables here instead of stdout")
    board.add_argument("--plots", type=path, help="write PNG figures into this folder")
    board.add_argument("--provenance", action="store_true", help="start with dates, versions, devices and the grid")
    board.add_argument("--suite", action="store_true",
                       help="one benchmark suite in kvpress's shape (RULER): the mean over tasks per policy, keep "
                            "ratio and protocol, per-task columns, the full cache per task")
    board.add_argument("--compare", nargs=2, metavar=("A", "B"),
                       help="only the paired comparison of two policies as the tables name them (full: the full "
                            "cache), or one policy at two budgets: NAME[@BUDGET], e.g. snapkv@0.25 snapkv@0.5")
    board.add_argument("--frontier", action="store_true",
                       help="eviction versus precision (the frontier preset's page): per task and protocol, score "
                            "against the bytes each cell held (log axis) for eviction only, quantization only and "
                            "both, the Pareto front marked, and per budget the best quantized point tested against "
                            "the best eviction-only one")
    board.set_defaults(run=run_leaderboard)


def presets() -> dict[str, Path]:
    """The grids shipped in ``kvpolicies_evals/presets``, by name."""
    from importlib import resources

    folder = resources.files("kvpolicies_evals") / "presets"
    found = {Path(item.name).stem: Path(str(item)) for item in folder.iterdir() if item.name.endswith(".yaml")}
    return dict(sorted(found.items()))


def sweep_config(args: argparse.Namespace):
    """The grid of ``--config`` / ``--quick`` / the default, with the command line's overrides, fully validated (every
    policy built once) so that a mistake fails before anything runs."""
    from kvpolicies.experiments.grid import QUICK, PolicySpec, SweepConfig, TaskSpec
    from kvpolicies.registry import get_policy, list_policies

    chosen = [option for option, given in (("--config", args.config is not None), ("--quick", args.quick),
                                           ("--preset", args.preset is not None)) if given]
    if len(chosen) > 1:
        raise UsageError(f"use one of {' and '.join(chosen)}: each names a whole grid")
    if args.preset is not None and args.preset not in presets():  # --preset '' is no preset, not the default grid
        raise UsageError(f"no preset named {args.preset!r}; choose one of: {', '.join(presets())}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1 sample per task, got {args.limit}; leave it out to run each "
                         "task's whole data")
    if args.config is not None or args.preset is not None:
        config = SweepConfig.load(args.config if args.config is not None else presets()[args.preset])
    else:
        config = QUICK.model_copy(deep=True) if args.quick else SweepConfig()
    updates: dict[str, Any] = {}
    # The list flags arrive as lists of non-empty items (options.comma_separated): an empty one is refused there.
    if args.policies is not None:  # every spec the grid gives a policy keeps its options, codec and protocols
        updates["policies"] = [spec for name in args.policies
                               for spec in ([s for s in config.policies if s.name == name] or [name])]
    if args.budgets is not None:
        updates["budgets"] = args.budgets
    if getattr(args, "compression_ratios", None) is not None:
        from kvpolicies.engine.budget import Budget

        updates["budgets"] = [Budget.from_compression_ratio(ratio) for ratio in args.compression_ratios]
    if args.tasks is not None:
        known = {task.name: task for task in config.reference_tasks + config.tasks}
        updates["tasks"] = [known.get(name, TaskSpec(name=name)) for name in args.tasks]
        updates["reference_tasks"] = []
    if args.models is not None:
        updates["models"] = args.models
    if args.protocols is not None:  # every policy's, the grid's own choices per policy included
        updates["protocols"] = args.protocols
        updates["policies"] = [spec.model_copy(update={"protocols": None}) if isinstance(spec, PolicySpec) else spec
                               for spec in updates.get("policies", config.policies)]
    if getattr(args, "codec", None) is not None:  # every policy that evicts; the reference stays at full precision
        from kvpolicies.registry import get_codec

        get_codec(args.codec)  # an unknown name is named with the known ones
        specs = updates.get("policies", config.policies) or [info.name for info in list_policies()]
        specs = [PolicySpec(name=spec) if isinstance(spec, str) else spec for spec in specs]
        coded = [spec.model_copy(update={"codec": args.codec})
                 if get_policy(spec.name, **spec.options).compresses else spec for spec in specs]
        cells_of = [(spec.name, spec.options, spec.codec, spec.protocols) for spec in coded]  # labels make no cell
        merged = [spec for i, spec in enumerate(coded) if cells_of[i] in cells_of[:i]]
        if merged:
            raise UsageError(f"--codec {args.codec} turns two of the grid's policies into one ({merged[0].title}): "
                             "the grid already compares codecs; leave --codec out, or name the policies")
        updates["policies"] = coded
    loading = loading_of(args).given()
    if loading:  # flags override the file's loading section one by one
        updates["loading"] = config.loading.model_dump(exclude_none=True) | loading
    given = {name: getattr(args, name) for name in ("executor", "address", "cpus_per_cell", "gpus_per_cell",
                                                    "max_retries") if getattr(args, name) is not None}
    if given:  # flags override the file's execution section one by one; --executor local drops its Ray settings
        from_file = {} if given.get("executor") == "local" else config.execution.model_dump(exclude_none=True)
        updates["execution"] = from_file | given
    if getattr(args, "prefill_chunk", None) is not None:
        updates["prefill_chunk"] = args.prefill_chunk
    config = SweepConfig.model_validate(config.model_dump() | updates)
    if args.limit is not None:  # validated copies: model_copy(update=...) would skip the check on limit
        config.tasks = [TaskSpec.model_validate(task.model_dump() | {"limit": args.limit}) for task in config.tasks]
        config.reference_tasks = [TaskSpec.model_validate(task.model_dump() | {"limit": args.limit})
                                  for task in config.reference_tasks]
    for spec in config.resolved_policies():
        get_policy(spec.name, **spec.options)  # fail before running anything
    from kvpolicies.experiments.sweep import check_tasks

    check_tasks(config)
    return config


def run_sweep_command(args: argparse.Namespace) -> int:
    from kvpolicies.experiments.results import load_results
    from kvpolicies.experiments.sweep import run_sweep
    from kvpolicies.reports.leaderboard import plot, render

    config = sweep_config(args)
    results = args.results or Path("results") / ("quick" if args.quick else args.preset or "default")
    if args.dry_run:
        from kvpolicies.experiments.dry_run import dry_run, finished_keys

        print(dry_run(config, finished_keys(config, results), memory_gib=args.memory,
                      share_prefill=not args.no_shared_prefill, decode_together=not args.decode_alone))
        return 0
    if args.memory is not None:
        raise UsageError("--memory sizes the estimate of --dry-run; give --dry-run too, or leave --memory out")
    try:
        records = run_sweep(config, results, executor=executor(config, not args.decode_alone),
                            share_prefill=not args.no_shared_prefill)
        failed = sum(record.status != "ok" for record in records)
    except KeyboardInterrupt:
        print(f"kvpolicies: interrupted; every finished cell is saved in {results}: run the same command to resume",
              file=sys.stderr)
        return 130
    records = load_results(results)
    print(render(results, records=records))
    if not args.no_plots:
        for path in plot(results, results / "plots", records=records):
            print(f"plot: {path}", file=sys.stderr)  # a log line, as leaderboard's: stdout holds the tables
    return 1 if failed else 0


def executor(config, decode_together: bool = True):
    """The executor the grid asks for: the local one, or Ray's, which needs the ``ray`` extra."""
    if config.execution.executor == "local":
        from kvpolicies.experiments.sweep import LocalExecutor

        return LocalExecutor(decode_together)
    try:
        from kvpolicies.experiments.ray_executor import RayExecutor
    except ImportError as error:
        raise UsageError(f"the Ray executor needs Ray ({error}); install it with pip install 'kvpolicies[ray]' (or "
                         "pip install -e '.[ray]' in a checkout)") from None
    return RayExecutor(config.execution, decode_together)


def run_leaderboard(args: argparse.Namespace) -> int:
    from kvpolicies.experiments.results import ResultsError, load_results
    from kvpolicies.reports.leaderboard import plot, render
    from kvpolicies.reports.suite import plot_suite, render_suite

    if args.frontier and (args.suite or args.compare):
        given = " and ".join(flag for flag, on in (("--suite", args.suite), ("--compare", args.compare)) if on)
        raise UsageError(f"--frontier and {given} are pages of their own; give one of them")
    if not args.results.is_dir():
        what = "is not a folder" if args.results.exists() else "does not exist"
        raise ResultsError(f"results folder {args.results} {what}; run `kvpolicies sweep` first")
    records = load_results(args.results)
    if args.frontier:
        return frontier_page(args, records)
    if args.compare:
        if args.suite or args.plots:
            raise UsageError("--compare prints one comparison; leave out --suite and --plots")
        write_or_print(render(args.results, args.format, records=records, compared=tuple(args.compare)), args.output)
        return 0
    images = []
    if args.plots:
        paths = plot_suite(records, args.plots) if args.suite else plot(args.results, args.plots, records=records)
        for path in paths:
            print(f"plot: {path}", file=sys.stderr)
            base = args.output.parent if args.output else Path.cwd()
            images.append(os.path.relpath(path, base))
    if args.suite:
        text = render_suite(args.results, records, args.format, with_provenance=args.provenance, images=images)
    else:
        text = render(args.results, args.format, with_provenance=args.provenance, images=images, records=records)
    write_or_print(text, args.output)
    return 0


def frontier_page(args: argparse.Namespace, records: list[ResultRecord]) -> int:
    """``leaderboard --frontier``: the eviction-versus-precision page, and its figures with ``--plots``."""
    from kvpolicies.reports.frontier import plot_frontier, render_frontier

    images = []
    if args.plots:
        try:
            paths = plot_frontier(records, args.plots)
        except ImportError as error:
            raise UsageError(f"{error}; or leave out --plots") from None
        base = args.output.parent if args.output else Path.cwd()
        for path in paths:
            print(f"plot: {path}", file=sys.stderr)
            images.append(os.path.relpath(path, base))
    write_or_print(render_frontier(args.results, records, args.format, with_provenance=args.provenance,
                                   images=images), args.output)
    return 0
