"""The README's code blocks stay true: its command lines parse, its Python runs, its plugin installs."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import kvpolicies
from kvpolicies.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(language: str) -> list[str]:
    """The README's fenced blocks of ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def block_with(language: str, marker: str) -> str:
    found = [block for block in blocks(language) if marker in block]
    assert len(found) == 1, f"expected one {language} block of README.md with {marker!r}, found {len(found)}"
    return found[0]


def command_lines() -> list[str]:
    """Every ``kvpolicies`` command of the README's bash blocks, continuation lines joined, but lm-eval's (whose
    arguments lm-eval parses)."""
    lines = [line.strip() for block in blocks("bash") for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line.startswith("kvpolicies ") and not line.startswith("kvpolicies lm-eval")]


def test_the_readme_has_the_blocks_these_tests_read():
    assert len(command_lines()) >= 8 and len(blocks("python")) >= 2 and blocks("toml")


@pytest.mark.parametrize("line", command_lines())
def test_every_kvpolicies_command_in_the_readme_parses(line):
    """A renamed or removed flag breaks the README's commands before any user meets it."""
    argv = shlex.split(line, comments=True)[1:]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"README.md's `{line}` does not parse: {stderr.getvalue().strip()}")


def test_every_readme_python_block_puts_its_tensors_on_the_models_device():
    """load_model() picks CUDA where there is one: inputs built on the CPU and never moved fail there."""
    for block in blocks("python"):
        for line in block.splitlines():
            if "return_tensors=" in line:
                assert ".to(model.device)" in line, f"README.md builds inputs on the CPU only: {line.strip()}"


@pytest.mark.slow
def test_the_python_example_generates_and_keeps_half_the_cache(real_model, monkeypatch, capsys):
    monkeypatch.setattr(kvpolicies, "load_model", lambda *args, **kwargs: real_model)  # loaded once per session
    namespace: dict = {}
    exec(compile(block_with("python", "kvpolicies.CompressedCache("), "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    stats = namespace["stats"]
    assert "kept" in printed and f"{stats.resident_bytes:,} bytes" in printed
    assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]  # it generated
    assert 0.4 < stats.kept_fraction <= 0.5  # slack_tokens=0: cut back to half at every step


def test_the_plugin_example_installs_and_is_listed(tmp_path):
    """The README's plugin (its module and its pyproject.toml, copied as they are) builds with pip and registers
    ``oldest`` through the entry point group, next to the built-ins."""
    package = tmp_path / "kvp-oldest"
    package.mkdir()
    (package / "kvp_oldest.py").write_text(block_with("python", "# kvp_oldest.py"))
    (package / "pyproject.toml").write_text(block_with("toml", "[project.entry-points.kvpolicies]"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(package)], check=True, capture_output=True)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(target), *sys.path])}
    listed = subprocess.run([sys.executable, "-m", "kvpolicies", "list"], env=env, capture_output=True, text=True,
                            check=True)
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    assert "oldest" in names and "l2norm" in names


@pytest.mark.slow
def test_the_lm_eval_python_example_runs_and_reports_kv_memory(capsys, monkeypatch):
    monkeypatch.chdir(README.parent)  # the block names evals/tasks relative to a checkout
    namespace: dict = {}
    exec(compile(block_with("python", "simple_evaluate("), "README.md", "exec"), namespace)
    results = namespace["results"]
    assert results["results"]["kvp_niah"]["sample_len"] == 10
    memory = results["config"]["kvpolicies"]["kv_memory"]
    assert memory["sequences"] == 10 and 0 < memory["resident_bytes_peak"] < memory["full_bytes_peak"]
    assert "kvp_niah" in capsys.readouterr().out
