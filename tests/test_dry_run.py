"""`kvpolicies sweep --dry-run`: the plan of a sweep, without loading a model, with estimates that rest on the
model's real shape."""

from __future__ import annotations

import huggingface_hub
import pytest
import torch
from transformers import AutoModelForCausalLM

from kvpolicies.cli import main
from kvpolicies.engine.cache import CompressedCache
from kvpolicies.experiments.dry_run import cell_memory, model_shape, workload
from kvpolicies.experiments.grid import SweepConfig, cells
from kvpolicies.integrations.models import load_model
from kvpolicies.integrations.protocol import Protocol


@pytest.fixture
def no_weights(monkeypatch):
    """A dry run loads no model: any attempt to load weights fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the dry run loaded a model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the env is too late


def test_the_gpu_presets_dry_run_prints_an_8b_grid_without_loading_it(no_weights, capsys, tmp_path):
    assert main(["sweep", "--preset", "ruler-gpu", "--dry-run", "--results", str(tmp_path / "none"),
                 "--memory", "80"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3354 cells, 0 already done, 3354 to run")  # 26 tasks x (16 policies x 4 x 2 + full)
    assert "Qwen/Qwen3-8B: 8.19 B parameters, 36 layers, 32 query heads, 8 KV heads of 128" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("Qwen/Qwen3-8B  kvp_ruler_")]
    assert len(rows) == 26 and all(row[2:4] == ["129", "500"] for row in rows)
    assert {row[4] for row in rows} >= {"3968", "8064"}  # 4k and 8k, the answer's tokens taken out
    assert all(row[6:8] == ["none", "needed"] for row in rows)  # 80 GiB hold 8k of an 8B model in bf16
    assert "estimated total:" in out


def test_a_small_memory_asks_for_a_prefill_chunk(no_weights, capsys, tmp_path):
    """Weights of 15.3 GiB on a device of 18.5 GiB (16.6 usable) leave too little for 8k tokens' activations in one
    pass, and enough for 4k. A policy that holds the whole prompt until it chooses (KVzip) is not helped by chunks:
    at 8k it does not fit at all."""
    plan = ["sweep", "--preset", "ruler-gpu", "--dry-run", "--results", str(tmp_path), "--memory", "18.5"]
    assert main([*plan, "--policies", "snapkv,streaming"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Qwen/Qwen3-8B  kvp_ruler_")]
    assert all("none needed" in row for row in rows[:13]) and all("--prefill-chunk" in row for row in rows[13:])
    assert main([*plan, "--policies", "kvzip"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Qwen/Qwen3-8B  kvp_ruler_")]
    assert all("none needed" in row for row in rows[:13])
    assert all("none: over 18.5 GiB even at 512" in row for row in rows[13:])


def test_the_shape_counts_the_real_models_parameters_and_the_kv_estimate_is_the_caches_own(tiny_pretrained):
    model, _ = load_model(tiny_pretrained, device="cpu", dtype="float32")
    shape = model_shape(tiny_pretrained)
    assert shape.parameters == sum(p.numel() for p in model.parameters()) and shape.source == "its config"
    config = SweepConfig.model_validate({"models": [tiny_pretrained], "policies": ["full"],
                                         "tasks": [{"name": "kvp_passkey", "metadata": {"lengths": [200]}}]})
    [cell] = cells(config)
    cache = CompressedCache(model, "full", 1.0)
    with torch.no_grad():
        model(torch.randint(3, 100, (1, 200)), cache=cache)
    memory = cell_memory(shape, cell, 200, 0, 4, None)
    assert memory["kv"] == cache.stats().full_bytes  # nothing evicted: no slack, no layer held whole apart
    assert memory["weights"] == shape.parameters * 4 and memory["scoring"] == 0  # the full cache scores nothing


def test_samples_follow_the_tasks_metadata_and_the_limit():
    config = SweepConfig.model_validate({"policies": ["full"], "tasks": [
        {"name": "kvp_passkey", "metadata": {"lengths": [1024, 2048], "depths": [0.5], "per_cell": 3}, "limit": 4},
        {"name": "kvp_ruler_vt", "metadata": {"max_seq_lengths": [4096]}}]})
    passkey, ruler = (workload(cell) for cell in cells(config))
    assert passkey.samples == 4 and passkey.lengths == ((1024, 3), (2048, 1))  # the first 4: shortest first
    assert ruler.samples == 500 and ruler.lengths[0][0] == 4096 - ruler.generated


def test_memory_without_a_dry_run_or_below_zero_is_refused(capsys):
    assert main(["sweep", "--quick", "--memory", "80"]) == 2
    assert "--memory sizes the estimate of --dry-run" in capsys.readouterr().err
    for wrong in ("0", "-8", "nan"):
        with pytest.raises(SystemExit):
            main(["sweep", "--quick", "--dry-run", "--memory", wrong])


def test_a_group_or_ruler_without_lengths_is_not_sized():
    config = SweepConfig.model_validate({"policies": ["full"], "tasks": ["kvp_ruler", "kvp_ruler_vt"]})
    assert [workload(cell).samples for cell in cells(config)] == [None, None]


def plan_rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("Qwen/Qwen3-8B  kvp_ruler_")]


def test_a_task_shares_each_prompts_prefill_unless_told_not_to_or_the_capture_does_not_fit(no_weights, capsys,
                                                                                            tmp_path):
    """As the sweep runs it: one prefill per prompt and protocol for a task's 129 cells (each protocol's capture
    on 80 GiB: 1.63 GiB at 4k, 3.32 at 8k, added to the worst cell's peak; decoded together, the caches of a
    protocol's cells too, within half of what is left), one per cell with --no-shared-prefill or where the capture
    takes more than half of what the worst cell leaves free (18.5 GiB: 2.2 left at 4k)."""
    plan = ["sweep", "--preset", "ruler-gpu", "--dry-run", "--results", str(tmp_path)]
    assert main([*plan, "--memory", "80", "--decode-alone"]) == 0
    shared = plan_rows(capsys.readouterr().out)
    assert main([*plan, "--memory", "80", "--no-shared-prefill"]) == 0
    alone = plan_rows(capsys.readouterr().out)
    assert main([*plan, "--memory", "18.5"]) == 0
    tight = plan_rows(capsys.readouterr().out)
    assert main([*plan, "--memory", "80"]) == 0
    together = plan_rows(capsys.readouterr().out)
    assert len(shared) == len(alone) == len(tight) == len(together) == 26
    assert all("2 for 129 cells" in row for row in shared + together)
    assert all("1 per cell" in row and " for " not in row for row in alone + tight)
    added = [float(s.split()[5]) - float(a.split()[5]) for a, s in zip(alone, shared)]  # printed to 0.1 GiB
    assert all(abs(gib - 1.63) <= 0.1 for gib in added[:13]) and all(abs(gib - 3.32) <= 0.1 for gib in added[13:])
    held = [float(t.split()[5]) - float(s.split()[5]) for s, t in zip(shared, together)]
    left = [(80 - float(s.split()[5])) / 2 for s in shared]
    assert all(0.5 < gib <= room + 0.1 for gib, room in zip(held, left))
    assert all(float(t.split()[5]) <= 80 for t in together)


def test_a_groups_time_counts_one_prefill_per_prompt_and_protocol_and_every_cells_generation():
    from kvpolicies.experiments.dry_run import (
        Device,
        Shape,
        _task_seconds,
        generation_seconds,
        prefill_seconds,
        together_seconds,
    )

    shape = Shape(layers=4, hidden=256, intermediate=1024, heads=4, kv_heads=2, head_dim=64, vocab=1000,
                  parameters=10**7, source="a test")
    device = Device(name="a test", flops_per_s=1e11, bandwidth_bytes_per_s=1e10, memory_bytes=2**34)
    config = SweepConfig.model_validate({
        "policies": ["full", "random", {"name": "snapkv", "protocols": ["query_agnostic", "query_aware"]}],
        "budgets": [0.25, 0.5], "tasks": [{"name": "kvp_passkey", "metadata": {"lengths": [1024, 2048]}}]})
    grid = cells(config)
    work = workload(grid[0])
    prefill = prefill_seconds(shape, device, work)
    generation = sum(generation_seconds(shape, device, work, cell.budget.value if cell.policy.name != "full" else 1,
                                        4) for cell in grid)
    assert len(grid) == 7 and {cell.protocol for cell in grid} == {Protocol.QUERY_AWARE, Protocol.QUERY_AGNOSTIC}
    assert _task_seconds(shape, device, work, [grid], 4, together=False) == pytest.approx(2 * prefill + generation)
    assert _task_seconds(shape, device, work, [[cell] for cell in grid], 4) == pytest.approx(7 * prefill + generation)
    assert generation < prefill  # a 12-token answer after a 2k prompt: the prefill is what sharing saves
    kept = {protocol: [cell.budget.value if cell.policy.name != "full" else 1 for cell in grid
                       if cell.protocol == protocol] for protocol in Protocol}
    batched = sum(together_seconds(shape, device, work, budgets, 4) for budgets in kept.values())
    assert _task_seconds(shape, device, work, [grid], 4) == pytest.approx(2 * prefill + batched)
    assert batched < generation / 2  # the weights read once per step for every row of a protocol
