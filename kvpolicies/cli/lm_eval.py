"""`kvpolicies lm-eval`: lm-evaluation-harness's own command line, with the ``kvpolicies`` model registered.

``lm_eval`` discovers no models from plugins, so this command registers ours and hands every argument to lm-eval's
parser unchanged. It adds what lm-eval cannot know: our help, a results folder named after the embedded model
when ``pretrained=`` is not given (lm-eval would invent a random name), the device this machine has (lm-eval
would pick ``cuda:0`` on any machine), a check of ``--limit``, and, under lm-eval's table of scores, the KV memory
they were measured at.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from kvpolicies.errors import UsageError

HELP = """\
kvpolicies lm-eval: lm-evaluation-harness with the model `kvpolicies` registered. Every argument goes to lm-eval
unchanged; lm-eval's own help follows.

  kvpolicies lm-eval --model kvpolicies --model_args policy=l2norm,budget=0.5 \\
      --tasks kvp_passkey --include_path evals/tasks --limit 10 --output_path results/

Model args of `--model kvpolicies` (comma-separated key=value):
  pretrained=ID|FOLDER|FILE.gguf   the model (default: the embedded SmolLM2-135M-Instruct)
  policy=NAME                      eviction policy (default: the full cache); see `kvpolicies list`
  budget=SPEC                      0.5 | 25% | 512tokens | 64MiB (default: 1.0, keep everything)
  compression_ratio=R              kvpress's convention instead of budget=: the fraction removed (0.75 =
                                   budget=0.25)
  slack_tokens=N                   decode-time growth per head before eviction runs again (default: 16)
  budget_windows=share|keep        sliding-window layers share the budget, or keep their whole window
                                   (default: share)
  codec=NAME                       how kept entries are stored: full (default), int8, int4; the budget in
                                   bytes buys entries at the codec's price (see `kvpolicies list`)
  stream_chunk=N                   chunk size of loglikelihood_rolling streaming (default: 128)
  prefill_chunk=N                  prefill generation prompts N tokens at a time, evicting between chunks
  any policy option                e.g. window_tokens=8, uncompressed_layers=[], scorer=l2norm
  policy.NAME=VALUE                the policy's option NAME, needed where HFLM or kvpolicies takes NAME too
                                   (a plain NAME= that both take is an error saying so)
  device_map=auto                  accelerate spreads a model too large for one GPU over every visible GPU
                                   (give no device= then)
  attn_implementation=NAME         attention of the layers not yet compressed: sdpa (default), eager,
                                   flash_attention_2, ...
  any of HFLM's args               dtype, revision, max_length, ... (device= and batch_size= act as --device
                                   and --batch_size)
An unknown key is an error that lists the valid ones.

---------------------------------------------------------------- lm-eval's help
"""


def add_commands(commands) -> None:
    """Listed for `kvpolicies --help`; the command itself never reaches argparse (see :func:`run_lm_eval`)."""
    commands.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness with the `kvpolicies` model registered (arguments as for lm_eval)",
        description="kvpolicies lm-eval --model kvpolicies --model_args policy=l2norm,budget=0.5 --tasks kvp_passkey "
        "--include_path evals/tasks --limit 10   (every argument goes to lm_eval unchanged)",
    )


def run_lm_eval(argv: Sequence[str]) -> int:
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    import kvpolicies.integrations.lm_eval  # noqa: F401  registers the model `kvpolicies`
    from kvpolicies.integrations.lm_eval_logging import quiet_lm_eval
    from kvpolicies.integrations.models import EMBEDDED_MODEL, default_device

    argv = list(argv)
    if not argv or any(arg in ("-h", "--help") for arg in argv):
        print(HELP, end="")
        argv = ["run", "--help"] if not argv or argv[0] != "run" else argv
    sys.argv = ["lm_eval", *argv]
    setup_logging()
    quiet_lm_eval()
    cli = HarnessCLI()
    args = cli.parse_args()
    if getattr(args, "model", None) == "kvpolicies":
        args.model_args = dict(args.model_args or {})
        args.model_args.setdefault("pretrained", EMBEDDED_MODEL)  # names lm-eval's results folder
        for key in ("device", "batch_size", "max_batch_size"):  # lm-eval passes these itself: one place only
            if key in args.model_args:
                setattr(args, key, args.model_args.pop(key))
        if getattr(args, "device", None) is None:  # lm-eval's default: cuda:0, even on a CPU-only machine
            placed = args.model_args.get("device_map") not in (None, "")  # device_map=auto places the model itself
            args.device = "auto" if placed else str(default_device())
    limit = getattr(args, "limit", None)
    if limit is not None and limit <= 0:
        raise UsageError(f"--limit {limit:g} would run no sample (lm-eval would run the whole task instead); give a "
                         "count >= 1, or a fraction in (0, 1)")
    import lm_eval.utils

    # lm-eval's console table shows the scores; the KV memory they were measured at goes right under it.
    original = lm_eval.utils.make_table
    lm_eval.utils.make_table = with_kv_table(original)  # read by lm-eval's run command when it prints
    try:
        cli.execute(args)
    finally:
        lm_eval.utils.make_table = original
    return 0


def with_kv_table(make_table: Callable[..., str]) -> Callable[..., str]:
    """lm-eval's ``make_table``, followed by :func:`kv_table` under the results of a ``kvpolicies`` run."""

    def table(result_dict: dict, column: str = "results", *args: Any, **kwargs: Any) -> str:
        text = make_table(result_dict, column, *args, **kwargs)
        info = (result_dict.get("config") or {}).get("kvpolicies")
        return text if column != "results" or not info else f"{text}\n{kv_table(info)}\n"

    return table


def kv_table(info: dict[str, Any]) -> str:
    """The KV cache the scores above were measured with: the policy, its budget (and kvpress's compression ratio),
    and the bytes its sequences held, over every request of the run (``config.kvpolicies`` of the results file)."""
    from tabulate import tabulate

    from kvpolicies.engine.budget import Budget

    budget = Budget.model_validate(info["budget"])
    memory, speed = info.get("kv_memory") or {}, info.get("speed") or {}
    mib = lambda value: "" if value is None else f"{value / 2**20:.2f}"  # noqa: E731
    kept = memory.get("resident_fraction_mean")
    rate = speed.get("decode_tokens_per_s")
    row = [info.get("policy"), str(budget), "" if budget.compression_ratio is None else f"{budget.compression_ratio:g}",
           info.get("codec", ""), info.get("protocol", ""), "" if kept is None else f"{kept:.1%}",
           mib(memory.get("resident_bytes_peak")), mib(memory.get("full_bytes_peak")),
           mib(memory.get("auxiliary_bytes_peak")), memory.get("sequences", ""), "" if rate is None else f"{rate:.1f}"]
    headers = ["kvpolicies", "budget", "compression ratio", "codec", "protocol", "kept (mean)", "KV MiB (peak)",
               "full MiB (peak)", "aux MiB (peak)", "sequences", "decode tok/s"]
    return tabulate([row], headers=headers, tablefmt="pipe", disable_numparse=True)
