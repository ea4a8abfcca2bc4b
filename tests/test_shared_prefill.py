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
    """Decoded one cell after another, bit for bit; decoded as one batch, the same records here too (this model's
    batched forward picks the tokens its single forward picks: a near tie could go the other way elsewhere)."""
    from kvpolicies.experiments.sweep import LocalExecutor

    config = grid(tiny_pretrained)
    alone = list(run_sweep(config, tmp_path / "alone", progress=False, share_prefill=False))
    apart = list(run_sweep(config, tmp_path / "apart", progress=False, executor=LocalExecutor(decode_together=False)))
    shared = list(run_sweep(config, tmp_path / "shared", progress=False))
    assert len(alone) == len(shared) == len(apart) == 1 + 6 * 2 * 2 and all(r.status == "ok" for r in shared)
    assert computed(apart) == computed(alone)  # same keys, same scores, same samples, same kept bytes
    assert computed(shared) == computed(alone)
    for record in shared + apart:
        speed = record.speed.model_extra
        cells = 1 + 6 * 2 if record.cell.protocol.value == "query_aware" else 6 * 2
        assert speed["shared_by"] == cells
        assert speed["shared_prefills"] == record.samples == 4 and speed["shared_prefill_s"] > 0  # one per prompt
        if record in shared:  # each answer decoded with its prompt's other cells (none stops at its first token)
            assert speed["decoded_together"] == cells and record.decoded_together_bytes > 0
            assert record.speed.decode_tokens_per_s > 0
        else:
            assert "decoded_together" not in speed and record.decoded_together_bytes is None
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
@pytest.mark.parametrize("together", [True, False], ids=["decoded together", "decoded apart"])
def test_a_shared_generation_stops_where_a_single_generate_call_stops(tiny_pretrained, together):
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
            SharedPrefill(members, together=together)
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


def test_cells_decode_apart_where_generate_would_change_the_logits_or_the_batch_fails(tiny_pretrained,
                                                                                     monkeypatch, capsys):
    """A request that ``generate`` would treat otherwise than by the argmax decodes cell by cell, and says why; a
    batch that raises gives way to each cell decoding alone, so that only a broken cell fails."""
    import torch

    from kvpolicies.experiments.grid import cells
    from kvpolicies.experiments.runner import cell_model
    from kvpolicies.integrations import shared
    from kvpolicies.integrations.shared import SharedPrefill, apart

    chosen = [cell for cell in cells(grid(tiny_pretrained)) if cell.protocol.value == "query_aware"][:3]
    members = [cell_model(cell) for cell in chosen]
    assert apart(members[0], {"do_sample": False, "attention_mask": None}) == ""
    assert apart(members[0], {"do_sample": False, "repetition_penalty": 1.3}) == \
        "the task passes repetition_penalty to generate"
    config = members[0].model.generation_config
    monkeypatch.setattr(config, "no_repeat_ngram_size", 3)
    assert apart(members[0], {}) == "the model's generation config sets no_repeat_ngram_size"
    monkeypatch.setattr(config, "no_repeat_ngram_size", 0)

    context = torch.randint(3, 1000, (1, 60), generator=torch.Generator().manual_seed(5))
    expected = [cell_model(cell)._model_generate(context, 80, [], do_sample=False) for cell in chosen]
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("a policy broke mid-batch (a stand-in)")

    monkeypatch.setattr(shared, "decode_together", broken)
    group = SharedPrefill(members)
    found = [member._model_generate(context, 80, [], do_sample=False) for member in members]
    assert calls == [1] and [f.tolist() for f in found] == [e.tolist() for e in expected]
    assert "decoding the cells of a request together failed (RuntimeError" in capsys.readouterr().err
    assert all(member.timings.decoded_together == 0 and member.timings.shared_prefills == 1 for member in members)
    assert all(member.request_memory.requests == 1 for member in members)  # the failed batch's request undone
    assert group.served == 1


def test_cells_decode_in_batches_that_fit_the_free_memory(tiny_pretrained, monkeypatch):
    """Every cell's cache is held while the batch decodes: where they would take more than the room, the cells
    decode in several batches, with the same answers."""
    import torch

    from kvpolicies.experiments.grid import cells
    from kvpolicies.experiments.runner import cell_model
    from kvpolicies.integrations import shared
    from kvpolicies.integrations.shared import SharedPrefill

    chosen = [cell for cell in cells(grid(tiny_pretrained)) if cell.protocol.value == "query_aware"][:5]
    context = torch.randint(3, 1000, (1, 60), generator=torch.Generator().manual_seed(6))
    expected = [cell_model(cell)._model_generate(context, 90, [], do_sample=False) for cell in chosen]
    members = [cell_model(cell) for cell in chosen]
    one_cache = 60 * 2 * 4 * 2 * 16 * 4  # a prompt's keys and values, every layer (4) and KV head (2), float32
    monkeypatch.setattr(shared, "decoding_room", lambda device: 3 * one_cache)  # about two caches and their growth
    SharedPrefill(members)
    found = [member._model_generate(context, 90, [], do_sample=False) for member in members]
    assert [f.tolist() for f in found] == [e.tolist() for e in expected]
    rows = [member.timings.decoded_together for member in members]
    assert 1 < max(rows) < len(members), rows

    # Out of memory for its first token while two caches wait: the batch is decoded, then the cell tries again.
    members = [cell_model(cell) for cell in chosen]
    SharedPrefill(members)
    monkeypatch.setattr(shared, "decoding_room", lambda device: None)  # no limit: only memory running out splits
    real, calls = type(members[2]).first_token, []

    def short_of_memory(self, *args, **kwargs):
        calls.append(self is members[2])
        if self is members[2] and calls.count(True) == 1:
            self.timings.add_shared(1.0, 5)  # what its replay had counted when memory ran out
            raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(members[2]), "first_token", short_of_memory)
    found = [member._model_generate(context, 90, [], do_sample=False) for member in members]
    assert [f.tolist() for f in found] == [e.tolist() for e in expected]
    assert calls.count(True) == 2 and [m.timings.decoded_together for m in members] == [2, 2, 3, 3, 3]
    assert all(m.timings.shared_prefills == 1 and m.request_memory.requests == 1 for m in members)


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


@pytest.mark.slow
def test_a_stage_that_ignores_the_budget_scores_each_prompt_once_for_every_budget(tiny_pretrained, tmp_path,
                                                                                   monkeypatch):
    """KVzip's second pass and DuoAttention's head scores do not depend on the budget: cells that differ only in
    budget score each prompt once, select their own budgets from the same scores, and write what they write
    alone; each is charged an equal part of the scoring and told its whole time."""
    from kvpolicies.registry import get_policy

    calls = []
    for name in ("kvzip", "duoattention"):
        kind = type(get_policy(name))
        real = kind.after_prefill
        monkeypatch.setattr(kind, "after_prefill",
                            lambda self, prefilled, real=real: calls.append(self.name) or real(self, prefilled))
    config = grid(tiny_pretrained, budgets=[0.25, 0.5, 0.75], policies=["kvzip", "duoattention"])
    alone = list(run_sweep(config, tmp_path / "alone", progress=False, share_prefill=False))
    scored_alone = len(calls)
    calls.clear()
    shared = list(run_sweep(config, tmp_path / "shared", progress=False))
    assert len(shared) == 1 + 2 * 3 * 2 and all(r.status == "ok" for r in shared + alone)
    assert computed(shared) == computed(alone)  # same kept entries, answers and scores
    prompts, protocols = 4, 2
    assert scored_alone == prompts * protocols * 2 * 3  # every cell scores every prompt
    assert sorted(calls) == sorted(["kvzip", "duoattention"] * prompts * protocols)  # once per prompt and protocol
    by_key = {r.key: r for r in alone}
    for record in shared:
        if record.identity.policy["policy"] == "full":
            continue
        speed, own = record.speed.model_extra, by_key[record.key].speed.model_extra
        assert speed["stage_shared_by"] == 3 and speed["stage_s"] > 0
        assert speed["stage_probe_tokens"] == own["stage_probe_tokens"]  # the method's second pass, as alone
        assert "stage_shared_by" not in own

    # A stage that may read the budget is scored by every cell, shared prefill or not.
    monkeypatch.setattr(type(get_policy("duoattention")), "stage_ignores_budget", False)
    calls.clear()
    again = list(run_sweep(config, tmp_path / "again", progress=False))
    assert computed(again) == computed(alone)
    assert calls.count("duoattention") == prompts * protocols * 3 and calls.count("kvzip") == prompts * protocols
    assert all("stage_shared_by" not in r.speed.model_extra for r in again if r.identity.policy["policy"] ==
               "duoattention")


def test_a_shared_stage_is_charged_in_equal_parts_where_each_cell_s_own_stage_runs():
    """Query-agnostic cells run their stage with the question's prefill, query-aware ones at the first decoding
    step: each is charged its part of the shared scoring there, and told the whole and its own selection."""
    from kvpolicies.engine.stages import SharedScores
    from kvpolicies.integrations.lm_eval import Timings

    shared = SharedScores(key=(), scores=[], seconds=6.0, probe_tokens=40)
    agnostic, aware = Timings(), Timings()
    agnostic.add_stage(0.5, 0)  # its own inputs and selection
    agnostic.add_shared_stage(shared, 3, in_prefill=True)
    aware.add_shared_stage(shared, 3, in_prefill=False)
    assert (agnostic.prefill_s, agnostic.decode_s) == (2.0, 0.0)
    assert (aware.prefill_s, aware.decode_s) == (0.0, 2.0)
    summary = agnostic.summary()
    assert (summary["stage_s"], summary["stage_probe_tokens"], summary["stage_shared_by"]) == (6.5, 40, 3)


@pytest.mark.parametrize("shared", [False, True])
def test_a_stage_keeps_its_budget_where_the_answer_ends_at_its_first_token(tiny_pretrained, shared):
    """The first token comes from the prompt's own forward, before a stage's turn (the next step): the stage then
    runs when the answer is done, so the record counts what the policy keeps, not the whole prompt."""
    import torch

    from kvpolicies.integrations.lm_eval import KVPoliciesLM
    from kvpolicies.integrations.shared import SharedPrefill

    context = torch.randint(3, 1000, (1, 60), generator=torch.Generator().manual_seed(4))
    first = KVPoliciesLM(pretrained=tiny_pretrained, policy="kvzip", budget=0.25)
    members = [first, KVPoliciesLM(pretrained=first.model, tokenizer=first.tokenizer, policy="kvzip", budget=0.5)]
    if shared:
        SharedPrefill(members)
    for member in members:
        assert member._model_generate(context, 61, [], do_sample=False).shape[1] == 61  # one token, no step
    kept = [member.kv_memory()["resident_fraction_mean"] for member in members]
    assert 0.2 < kept[0] <= 0.3 and 0.45 < kept[1] <= 0.55, kept
    for member in members:  # charged to the stage alone, alike in both ways: nothing was decoded after it
        summary = member.timings.summary()
        assert summary["stage_s"] > 0 and summary["decode_s"] == 0.0 and member.stage_after
    if shared:  # scored once for both budgets, each charged its part
        assert [member.timings.summary()["stage_shared_by"] for member in members] == [2, 2]


def test_a_stage_that_fails_after_a_first_token_answer_fails_its_own_cell_only(tiny_pretrained, monkeypatch):
    """Decoded together, a cell done at its first token runs its stage then (to count what it keeps); if that
    raises, only that cell fails, and the others keep their answers."""
    import torch

    from kvpolicies.integrations.lm_eval import KVPoliciesLM
    from kvpolicies.integrations.shared import SharedPrefill

    context = torch.randint(3, 1000, (1, 60), generator=torch.Generator().manual_seed(4))
    first = KVPoliciesLM(pretrained=tiny_pretrained, policy="kvzip", budget=0.25)
    members = [first, KVPoliciesLM(pretrained=first.model, tokenizer=first.tokenizer, policy="kvzip", budget=0.5)]
    group = SharedPrefill(members, together=True)

    def broken(cache):
        raise RuntimeError("a stage broke after the answer (a stand-in)")

    monkeypatch.setattr(members[1], "_measure", broken)
    assert members[0]._model_generate(context, 61, [], do_sample=False).shape[1] == 61
    with pytest.raises(RuntimeError, match="a stage broke after the answer"):
        members[1]._model_generate(context, 61, [], do_sample=False)
    assert id(members[1]) in group.failed and id(members[0]) not in group.failed
    assert members[0].kv_memory()["resident_fraction_mean"] <= 0.3  # its own stage ran
