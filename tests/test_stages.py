"""The after-prefill stage: one choice over every layer once the prompt is in, and a second pass of the model."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvpolicies import CompressedCache, Policy, PolicyConfig
from kvpolicies.errors import PluginError
from tests.helpers import tiny_llama


class GlobalNorm(Policy):
    """Keep the lowest-norm keys across all layers and heads at once (the example of the stage's docs)."""

    name = "global-norm-test"

    def after_prefill(self, prefilled):
        return [None if inputs is None else -inputs.keys.float().norm(dim=-1) for inputs in prefilled.layers]


class RepeatTail(Policy):
    """KVzip in miniature: score entries by the attention the prompt's last 6 tokens, fed again, give them."""

    name = "repeat-tail-test"

    def after_prefill(self, prefilled):
        return prefilled.attention_from(prefilled.ids[:, -6:], reduce="max")


def prefill(model, cache, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask, cache=cache).logits[:, -1:].argmax(-1)


def test_a_stage_keeps_one_top_k_of_every_layer_and_head_together():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = CompressedCache(model, GlobalNorm(), 0.25)
    prefill(model, cache, ids)
    assert all(not layer.packed for layer in cache.layers)  # nothing evicted while prefilling
    norms = torch.stack([-layer.keys[0].norm(dim=-1) for layer in cache.layers])  # [layers, heads, 40]
    # Each head's newest entry first, then the best scores: 160 of 640 entries (a quarter), over all of them at once.
    ranked = norms.clone()
    ranked[..., -1] = float("inf")
    want = torch.zeros_like(ranked, dtype=torch.bool).flatten()
    want[ranked.flatten().topk(160).indices] = True
    want = want.view_as(ranked)
    cache.after_prefill(model)
    kept = cache.kept_per_head()[:, 0]
    assert kept.sum() == 160 and torch.equal(kept, want.sum(-1))
    assert len(set(kept.flatten().tolist())) > 1  # not a uniform share: layers and heads compete
    for layer, keep in zip(cache.layers, want):
        for head, (_, _, keys, _) in enumerate(list(layer.runs())):
            torch.testing.assert_close(-keys.norm(dim=-1), norms[layer.layer_idx, head][keep[head]], rtol=0, atol=0)
    assert cache.resident_bytes() == 160 * cache.shape.entry_bytes


def test_the_stage_runs_before_the_first_decoding_step_and_keeps_what_follows_whole():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = CompressedCache(model, GlobalNorm(), 0.25)
    token = prefill(model, cache, ids)
    with torch.no_grad():
        for _ in range(5):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
    stats = cache.stats()
    assert stats.kept_entries - stats.appended_entries == 160  # the prompt's quarter, chosen once
    assert stats.appended_entries == 5 * 16  # the 5 decoded tokens in every (layer, head), not charged
    assert cache.context_lengths == [40]


def test_a_left_padded_batch_gives_each_prompt_its_own_budget_and_result():
    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :12] = 0
    batch = CompressedCache(model, GlobalNorm(), 0.25)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, cache=batch, max_new_tokens=4, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    for row, length in ((0, 40), (1, 28)):
        alone = CompressedCache(model, GlobalNorm(), 0.25)
        with torch.no_grad():
            single = model.generate(ids[row : row + 1, 40 - length :], cache=alone, max_new_tokens=4,
                                    do_sample=False, output_scores=True, return_dict_in_generate=True,
                                    pad_token_id=0)
        assert torch.equal(single.sequences[0, length:], out.sequences[row, 40:])
        torch.testing.assert_close(torch.stack(single.scores)[:, 0], torch.stack(out.scores)[:, row], atol=1e-4,
                                   rtol=0)
        assert alone.kept_per_head().sum() == batch.kept_per_head()[:, row].sum()  # the same entries kept
    assert batch.sequence_stats()[1].kept_entries - batch.sequence_stats()[1].appended_entries == 28 * 16 // 4


def test_a_split_context_is_compressed_before_its_question_is_read():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(3))
    cache = CompressedCache(model, GlobalNorm(), 0.25)
    prefill(model, cache, ids[:, :40])
    cache.context_lengths = [40]
    prefill(model, cache, ids[:, 40:])  # the question: the stage runs first, on the 40-token context
    stats = cache.stats()
    assert stats.kept_entries - stats.appended_entries == 160 and stats.appended_entries == 8 * 16


def test_a_second_pass_reports_the_attention_the_prompt_receives_and_changes_nothing():
    torch.manual_seed(0)
    model = tiny_llama(attn_implementation="eager")
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    probe = ids[:, -6:]
    with torch.no_grad():  # the reference: the prompt and the probe in one pass, attention weights read out
        full = model(torch.cat([ids, probe], 1), cache=DynamicCache(config=model.config), output_attentions=True)
    expected = [a[0, :, 30:, :30].reshape(2, 3, 6, 30).amax(dim=(1, 2)) for a in full.attentions]  # [kv, 30]
    seen = {}

    class Probing(Policy):
        name = "probing-test"

        def after_prefill(self, prefilled):
            before = [layer.keys.clone() for layer in cache.layers]
            received = prefilled.attention_from(probe, reduce="max")
            seen["received"] = received
            seen["unchanged"] = all(torch.equal(b, layer.keys) for b, layer in zip(before, cache.layers))
            seen["lengths"] = {layer.logical_length for layer in cache.layers}
            return received

    cache = CompressedCache(model, Probing(), 0.5)
    prefill(model, cache, ids)
    cache.after_prefill(model)
    for got, want in zip(seen["received"], expected):
        torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0)
    assert seen["unchanged"] and seen["lengths"] == {30}
    assert cache.kept_per_head().sum() == 30 * 16 // 2


def test_kvzip_in_miniature_runs_through_generate():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    cache = CompressedCache(model, RepeatTail(), 0.25)
    with torch.no_grad():
        out = model.generate(ids, cache=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
        plain = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == plain.shape
    stats = cache.stats()
    assert stats.kept_entries - stats.appended_entries == 160


@pytest.mark.parametrize(("returned", "named"), [
    (lambda p: None, "returned NoneType from after_prefill()"),
    (lambda p: [None] * len(p.layers), "returned NoneType from after_prefill()"),
    (lambda p: [-i.keys.norm(dim=-1)[..., :-1] for i in p.layers], "shape [1, 2, 39]"),
])
def test_a_stage_that_breaks_its_contract_is_the_plugins_fault(returned, named):
    class Broken(Policy):
        name = "broken-stage-test"

        def after_prefill(self, prefilled):
            return returned(prefilled)

    model = tiny_llama()
    cache = CompressedCache(model, Broken(), 0.25)
    prefill(model, cache, torch.randint(3, 128, (1, 40)))
    with pytest.raises(PluginError, match="broken-stage-test") as error:
        cache.after_prefill(model)
    assert named in str(error.value)


def test_a_stage_may_not_edit_the_cache_it_reads():
    class Scribbler(Policy):
        name = "scribbling-stage-test"

        def after_prefill(self, prefilled):
            prefilled.layers[0].keys.zero_()
            return [-i.keys.norm(dim=-1) for i in prefilled.layers]

    model = tiny_llama()
    cache = CompressedCache(model, Scribbler(), 0.25)
    prefill(model, cache, torch.randint(3, 128, (1, 40)))
    with pytest.raises(PluginError, match=r"edited inputs.keys in place in after_prefill\(\)"):
        cache.after_prefill(model)


def test_policies_without_a_stage_never_install_one():
    model = tiny_llama()
    CompressedCache(model, "snapkv", 0.5)
    assert getattr(model, "_kvpolicies_stage_hook", None) is None
    assert not Policy.has_stage.fget(Policy(PolicyConfig()))


def test_a_stage_run_after_every_chunk_holds_the_budget_of_all_seen_so_far():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(6))
    cache = CompressedCache(model, GlobalNorm(), 0.25)
    for start in range(0, 60, 20):  # as a loglikelihood streamed in chunks does
        prefill(model, cache, ids[:, start : start + 20])
        cache.after_prefill(model)
        assert cache.kept_per_head().sum() == (start + 20) * 16 // 4  # earlier survivors are judged again
    assert cache.stats().appended_entries == 0


def test_the_stage_example_in_the_hook_docs_runs_as_written():
    import textwrap

    import kvpolicies.hookspecs

    doc = kvpolicies.hookspecs.register_policies.__doc__
    block = doc.split("runnable as is")[1].split("::\n", 1)[1].split("\n\n    ``prefilled")[0]
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(7))
    namespace = {"model": model, "ids": ids}
    exec(textwrap.dedent(block), namespace)  # noqa: S102 - the documentation's own example
    stats = namespace["cache"].stats()
    assert stats.kept_entries - stats.appended_entries == 160 and stats.appended_entries > 0


def test_lm_eval_runs_the_stage_once_the_context_of_each_request_is_in(tiny_pretrained, fresh_registry):
    import kvpolicies
    from lm_eval.api.instance import Instance

    from kvpolicies.integrations.lm_eval import KVPoliciesLM

    class Plugin:
        @kvpolicies.hookimpl
        def register_policies(self, register):
            register(GlobalNorm)

    kvpolicies.registry.registry().register_plugin(Plugin(), name="global-norm-plugin")
    pair = ("The capital of France is a city on a river, and it is", " Paris, on the Seine.")
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=0)]
    lm = KVPoliciesLM(pretrained=tiny_pretrained, policy=GlobalNorm.name, budget=0.25)
    (staged, _), = lm.loglikelihood(requests)
    memory = lm.kv_memory()
    stats, = lm.kv_measurements  # the context's quarter, chosen once; the continuation kept whole after it
    shape = lm.new_cache().shape
    tokens, after = stats.full_entries // shape.cells, stats.appended_entries // shape.cells
    assert after > 0 and stats.kept_entries - stats.appended_entries == (tokens - after) * shape.cells // 4
    assert memory["context_bytes_mean"] < 0.25 * memory["full_bytes_mean"]
    (full, _), = KVPoliciesLM(pretrained=tiny_pretrained, policy="full").loglikelihood(requests)
    assert staged != pytest.approx(full, abs=1e-4)  # the continuation read the compressed context
    text = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=("".join(pair),), idx=0)]
    streamed = KVPoliciesLM(pretrained=tiny_pretrained, policy=GlobalNorm.name, budget=0.25, stream_chunk=4)
    rolling = KVPoliciesLM(pretrained=tiny_pretrained, policy="full", stream_chunk=4)
    assert streamed.loglikelihood_rolling(text)[0] != pytest.approx(rolling.loglikelihood_rolling(text)[0], abs=1e-4)
    assert streamed.kv_memory()["resident_fraction_mean"] < 0.5  # chosen again after every chunk


def test_no_head_is_left_empty_however_high_a_stage_scores_one_layer():
    class FirstLayerFirst(Policy):
        name = "first-layer-first-test"

        def after_prefill(self, prefilled):
            return [torch.full_like(i.valid, float("inf") if i.layer_idx < 6 else 0.0, dtype=torch.float32)
                    for i in prefilled.layers]

    model = tiny_llama()
    cache = CompressedCache(model, FirstLayerFirst(), 0.25)
    prefill(model, cache, torch.randint(3, 128, (1, 40)))
    cache.after_prefill(model)
    kept = cache.kept_per_head()[:, 0]
    # 480 entries score +inf, more than the 160 kept: still every head keeps its newest entry, then layers in order.
    assert kept.min() >= 1 and kept.sum() == 160 and (kept[0] == 40).all() and (kept[6:] == 1).all()


@pytest.mark.filterwarnings("ignore::UserWarning")  # kvzip without a tokenizer repeats its context bare
@pytest.mark.parametrize("policy", ["kvzip", "duoattention"])
def test_caches_given_a_stage_s_shared_scores_keep_what_each_keeps_scoring_alone(policy):
    """A stage that ignores the budget scored once (``share_stage``) serves caches of any budget: each keeps
    exactly what it keeps scoring alone; a cache over another prompt, or another window rule, scores its own."""
    from kvpolicies.engine.budget import Budget
    from kvpolicies.engine.replay import capture, replay
    from tests.test_replay import assert_same, prompt, state

    model = tiny_llama()
    prefill = capture(model, prompt(length=64))

    def replayed(budget, captured=prefill) -> CompressedCache:
        cache = CompressedCache(model, policy, budget)
        cache.context_lengths = [52]  # the last 12 tokens a question, kept whole
        replay(captured, cache)
        return cache

    scorer = replayed(0.5)
    shared = scorer.share_stage(model)
    assert not scorer.stage_ran and (shared.probe_tokens > 0) == (policy == "kvzip") and scorer.probe_tokens == 0
    kept = []
    for budget in (0.25, 0.5):
        alone, given = replayed(budget), replayed(budget)
        given.shared_scores = shared
        alone.after_prefill(model)
        given.after_prefill(model)
        assert given.used_shared_scores and not alone.used_shared_scores
        assert_same(state(given), state(alone))
        kept.append(given.stats().resident_bytes)
    assert kept[0] < kept[1]

    other_prompt = replayed(0.25, capture(model, prompt(length=64, seed=4)))
    other_windows = replayed(Budget.parse(0.25).model_copy(update={"windows": "keep"}))
    for cache in (other_prompt, other_windows):
        cache.shared_scores = shared
        cache.after_prefill(model)
        assert cache.stage_ran and not cache.used_shared_scores
