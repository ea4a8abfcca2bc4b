"""One prefill, many cells: a sweep that prefills each prompt once for a task's cells writes the records each cell
writes alone."""

from __future__ import annotations

import pytest

from kvpolicies.experiments.grid import SweepConfig
from kvpolicies.experiments.results import load_results
from kvpolicies.experiments.sweep import run_sweep

SAME = ("metrics", "primary_metric", "score", "samples", "outcomes", "stderr", "higher_is_better", "status",
        "error")
"""What a record computes, as opposed to how long and in how much memory (timings, peaks, provenance)."""


def grid(model: str, **extra) -> SweepConfig:
    return SweepConfig.model_validate({
        "models": [model], "budgets": [0.25, 0.5], "protocols": ["query_aware", "query_agnostic"],
        "policies": ["full", "snapkv", "streaming", "h2o", "keydiff", "headkv",
                     {"name": "snapkv", "codec": "int4", "label": "snapkv int4"}],
        "tasks": [{"name": "kvp_passkey", "metadata": {"lengths": [160], "depths": [0.3, 0.7], "per_cell": 2}}],
        **extra})


def computed(records) -> dict[str, dict]:
    found = {}
    for record in records:
        fields = record.model_dump(mode="json", include=set(SAME))
        fields["kv_memory"] = record.kv_memory.model_dump(mode="json") if record.kv_memory else None
        found[record.key] = fields
    return found


@pytest.mark.slow
def test_cells_that_share_each_prefill_write_what_each_writes_alone(tiny_pretrained, tmp_path):
    config = grid(tiny_pretrained)
    alone = list(run_sweep(config, tmp_path / "alone", progress=False, share_prefill=False))
    shared = list(run_sweep(config, tmp_path / "shared", progress=False))
    assert len(alone) == len(shared) == 1 + 6 * 2 * 2 and all(r.status == "ok" for r in shared)
    assert computed(shared) == computed(alone)  # same keys, same scores, same samples, same kept bytes
    for record in shared:
        speed = record.speed.model_extra
        assert speed["shared_by"] == (1 + 6 * 2 if record.cell.protocol.value == "query_aware" else 6 * 2)
        assert speed["shared_prefills"] == record.samples == 4 and speed["shared_prefill_s"] > 0  # one per prompt
    assert all("shared_by" not in (r.speed.model_extra or {}) and r.shared_capture_bytes is None for r in alone)
    assert all(r.shared_capture_bytes > r.kv_memory.full_bytes_peak for r in shared)  # keys, values and queries
    assert {r.key for r in load_results(tmp_path / "shared")} == {r.key for r in alone}


def test_a_request_that_cannot_share_runs_per_cell_and_says_why(tiny_pretrained, monkeypatch, capsys):
    import torch

    from kvpolicies.experiments.grid import cells
    from kvpolicies.experiments.runner import cell_model
    from kvpolicies.integrations import shared
    from kvpolicies.integrations.shared import SharedPrefill, capture_bytes, shareable

    aware = [cell for cell in cells(grid(tiny_pretrained)) if cell.protocol.value == "query_aware"]
    members = [cell_model(cell) for cell in aware[:3]]
    group = SharedPrefill(members)
    one = torch.ones(1, 100, dtype=torch.long)
    assert shareable(members[0], one, {"do_sample": False}) == ""
    assert shareable(members[0], torch.ones(2, 100, dtype=torch.long), {}) == "a batch of several prompts"
    assert shareable(members[0], one, {"do_sample": True}) == "sampling"
    config = members[0].model.config
    expected = 100 * config.num_hidden_layers * (2 * config.num_key_value_heads + config.num_attention_heads) * (
        config.hidden_size // config.num_attention_heads) * 4
    assert capture_bytes(members[0].model, 100) == expected
    monkeypatch.setattr(shared, "free_bytes", lambda device: expected)  # the capture would take all of it
    assert "would take more than half the free memory" in shareable(members[0], one, {})
    outputs = [member._model_generate(one, 103, ["\n"], do_sample=False) for member in members]
    assert group.alone == 1 and group.served == 0 and all(o.shape[1] > 100 for o in outputs)
    assert capsys.readouterr().err.count("each cell prefills its own prompts here") == 1


@pytest.mark.slow
def test_a_group_with_finished_cells_computes_only_the_missing_ones_alike(tiny_pretrained, tmp_path):
    import shutil

    config = grid(tiny_pretrained, protocols=["query_aware"])
    alone = {r.key: r for r in run_sweep(config, tmp_path / "alone", progress=False,
                                         share_prefill=False)}
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    kept = sorted(alone)[::2]  # every other cell finished before the interruption
    for key in kept:
        shutil.copy(tmp_path / "alone" / f"{key}.json", resumed / f"{key}.json")
    computed_now = {r.key: r for r in run_sweep(config, resumed, progress=False)}
    assert set(computed_now) == set(alone) - set(kept)  # only the missing cells ran, sharing their prefills
    assert all(r.speed.model_extra["shared_by"] == len(computed_now) for r in computed_now.values())
    assert computed(computed_now.values()) == computed(alone[key] for key in computed_now)


@pytest.mark.slow
def test_a_shared_generation_stops_where_a_single_generate_call_stops(tiny_pretrained):
    """After the first token: an end-of-sequence token, a stop sequence that the first token completes, the
    length; and otherwise the same tokens to the end."""
    import torch

    from kvpolicies.experiments.grid import cells
    from kvpolicies.experiments.runner import cell_model
    from kvpolicies.integrations.shared import SharedPrefill

    chosen = [cell for cell in cells(grid(tiny_pretrained)) if cell.protocol.value == "query_aware"][:3]
    context = torch.randint(3, 1000, (1, 60), generator=torch.Generator().manual_seed(4))

    def outputs(max_length: int, stop: list[str], shared: bool) -> list[torch.Tensor]:
        members = [cell_model(cell) for cell in chosen]
        if shared:
            SharedPrefill(members)
        return [member._model_generate(context, max_length, stop, do_sample=False) for member in members]

    alone = outputs(90, [], shared=False)
    first = int(alone[0][0, 60])
    tokenizer = cell_model(chosen[0]).tokenizer
    model = cell_model(chosen[0]).model
    for max_length, stop in ((90, []), (61, []), (62, []), (90, [tokenizer.decode([first])])):
        expected = outputs(max_length, stop, shared=False)
        assert [o.tolist() for o in outputs(max_length, stop, shared=True)] == [o.tolist() for o in expected]
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = first  # the first token ends the generation
        expected = outputs(90, [], shared=False)
        assert expected[0].shape[1] == 61
        assert [o.tolist() for o in outputs(90, [], shared=True)] == [o.tolist() for o in expected]
    finally:
        model.generation_config.eos_token_id = saved


def test_a_task_built_once_is_copied_and_leaves_the_generators_as_a_build_of_its_own():
    """The cells of a task share one build of it (RULER makes 500 samples per build), each with its own copy; tasks
    may draw from the global generators, which lm-eval seeds just before it loads them, so every copy leaves them
    where a fresh build would, and what runs next draws the same."""
    import random

    import numpy
    import torch

    from kvpolicies.experiments.runner import BuiltOnce

    builds = []

    class Drawing:  # a task manager whose tasks draw their samples from the global generators
        def load(self, names):
            builds.append(names)
            return {"tasks": {name: [random.random(), numpy.random.rand(), torch.rand(1).item()] for name in names}}

        def described(self):
            return "the manager's own"

    def seeded_load(manager, names, seed=0):
        random.seed(seed), numpy.random.seed(seed), torch.manual_seed(seed)
        loaded = manager.load(names)
        return loaded, (random.random(), numpy.random.rand(), torch.rand(1).item())

    fresh, after_fresh = seeded_load(Drawing(), ["a"])
    once = BuiltOnce(Drawing())
    first, after_first = seeded_load(once, ["a"])
    first["tasks"]["a"].append("answers")  # an evaluation writes into its copy
    second, after_second = seeded_load(once, ["a"])
    assert len(builds) == 2  # the plain manager's build, the wrapped one's: the second load built nothing
    assert first["tasks"]["a"][:3] == second["tasks"]["a"] == fresh["tasks"]["a"]
    assert after_first == after_second == after_fresh
    reseeded, _ = seeded_load(once, ["a"], seed=1)  # another seed: another build, as lm-eval's own would be
    assert len(builds) == 3 and reseeded == seeded_load(Drawing(), ["a"], seed=1)[0] != fresh
    seeded_load(once, ["b"])
    assert builds[-1] == ["b"] and once.described() == "the manager's own"


def test_the_environment_is_described_once_per_process(monkeypatch):
    import lm_eval.evaluator

    from kvpolicies.experiments import runner

    calls = []
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda storage: calls.append(1) or storage.update(
        {"pretty_env_info": "pip list", "transformers_version": "5"}))
    runner._environment_described_once.cache_clear()
    try:
        runner._environment_described_once()
        first, second = {}, {}
        lm_eval.evaluator.add_env_info(first)
        lm_eval.evaluator.add_env_info(second)
        assert calls == [1] and first == second == {"pretty_env_info": "pip list", "transformers_version": "5"}
        first["pretty_env_info"] = "changed"  # each result holds its own copy
        assert second["pretty_env_info"] == "pip list"
    finally:
        runner._environment_described_once.cache_clear()  # the next cell installs it over lm-eval's own again
