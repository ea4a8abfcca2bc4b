"""The command line: listing, errors with fixes, generation output."""

from __future__ import annotations

import json

import pytest

import kvpolicies
from kvpolicies.cli import main, parse_options


def test_list_shows_every_policy_with_its_options(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("full", "l2norm", "random", "streaming"):
        assert name in out
    assert "uncompressed_layers=(0, 1)" in out and "keys" in out
    assert "scorer_options={}" in out and "Undefined" not in out
    assert max(len(line) for line in out.splitlines()) <= 100  # was a 158-column table


def test_help_loads_neither_torch_nor_transformers():
    """`--help` of every command must be instant: the command modules import heavy libraries only when they run."""
    import subprocess
    import sys

    code = ("import sys; from kvpolicies.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_version_names_the_installed_distribution(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvpolicies {version('kvpolicies')}"


@pytest.mark.parametrize("command", ["generate", "inspect", "selfcheck"])
def test_compression_ratio_names_a_budget_wherever_budget_does(command):
    from kvpolicies.cli import build_parser
    from kvpolicies.cli.options import budget_of
    from kvpolicies.engine.budget import Budget

    assert budget_of(build_parser().parse_args([command, "--compression-ratio", "0.875"])) == Budget(value=0.125)
    default = "0.25" if command == "selfcheck" else "0.5"
    assert budget_of(build_parser().parse_args([command])) == Budget.parse(default)
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--budget", "0.5", "--compression-ratio", "0.5"])


def test_list_json_is_machine_readable(capsys):
    assert main(["list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["l2norm"]["needs"] == ["keys"]
    assert rows["streaming"]["options"]["sink_tokens"]["default"] == 4
    assert "arXiv 2406.11430" in rows["l2norm"]["paper"] and "arXiv 2401.06104" in rows["tova"]["paper"]
    free = {name for name, row in rows.items() if row["attention_free"]}
    assert {"l2norm", "keydiff", "lagkv", "expected_attention", "random", "streaming"} <= free
    assert not free & {"h2o", "snapkv", "tova", "criticalkv", "kvzip", "duoattention"}  # kvzip's stage runs the model
    assert sorted(name for name, row in rows.items() if row["after_prefill_stage"]) == ["duoattention", "kvzip"]


def test_list_codecs_json_gives_what_a_budget_buys_entries_at_and_names_a_broken_codec(capsys, fresh_registry):
    class Broken(kvpolicies.Codec):
        name = "broken-price-test"

        def entry_bytes(self, head_dim, dtype):
            raise ValueError("no price")

    class Plugin:
        @kvpolicies.hookimpl
        def register_codecs(self, register):
            register(Broken)

    kvpolicies.registry.registry().register_plugin(Plugin(), name="broken-price-plugin")
    assert main(["list", "--codecs", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert {"full", "int8", "int4", "kivi4", "kivi2", "think"} <= set(rows)  # codecs only: no policy rows
    assert "snapkv" not in rows
    assert rows["full"]["entry_bytes_bfloat16"] == {"64": 256, "128": 512} and rows["full"]["lossless"]
    assert rows["kivi4"]["entry_bytes_bfloat16"]["64"] == 80 and rows["kivi4"]["group"] == 32
    assert rows["kivi4"]["full_precision_newest"] == [128, 159] and not rows["kivi4"]["fitted_per_head"]
    assert rows["think"]["fitted_per_head"] and rows["think"]["entry_bytes_bfloat16"]["64"] == 192
    assert rows["broken-price-test"]["plugin"] == "broken-price-plugin"
    assert rows["broken-price-test"]["error"] == "ValueError: no price"
    assert main(["list", "--codecs"]) == 0
    listed = capsys.readouterr().out
    assert "kivi4  (80 B / 160 B)" in listed and "broken: ValueError" in listed and "l2norm" not in listed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--policy", "l2nrm", "hi"], "Did you mean 'l2norm'"),
        (["generate", "--budget", "7", "hi"], "'7 tokens'"),
        (["generate", "--budget", "0", "hi"], "(0, 1]"),
        (["generate", "--set", "sinks=4", "hi"], "valid options: sink_tokens"),
        (["generate"], "either as an argument or with --file"),
    ],
)
def test_bad_input_fails_with_a_message_that_names_the_fix(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_set_values_are_json_when_they_parse():
    assert parse_options(["uncompressed_layers=[]", "keep_highest=true", "name=abc"]) == {
        "uncompressed_layers": [],
        "keep_highest": True,
        "name": "abc",
    }


def test_allocation_table_marks_windows_and_measures_each_layer_against_the_models_own_cache():
    from kvpolicies import Budget, CacheShape
    from kvpolicies.cli.policies import allocation_table

    shape = CacheShape(num_layers=2, num_kv_heads=2, head_dim=16, dtype_bytes=2, windows=(64, None))
    table = allocation_table(Budget(value=0.5, windows="keep").allocate(1000, shape).tokens, 1000, shape)
    window_row, full_row = table.splitlines()[2:4]
    assert window_row.split()[:5] == ["0", "(window", "64)", "63", "63"] and window_row.endswith("100.0%")
    assert full_row.split() == ["1", "469", "468", "46.9%"]  # 0.5 x (63 + 1000) x 2 heads, less the windows
    shared = allocation_table(Budget(value=0.5).allocate(1000, shape).tokens, 1000, shape)
    window_row, full_row = shared.splitlines()[2:4]  # one entry each, then every layer half of what it holds
    assert window_row.split() == ["0", "(window", "64)", "33", "32", "51.6%"]
    assert full_row.split() == ["1", "499", "499", "49.9%"]
