"""Q-Filters and the calibration it runs on: filters against an explicit SVD of the model's own queries, the kept
keys against their projections, one calibration per model and config, and the errors a user or a plugin meets."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpolicies
from kvpolicies import CompressedCache, Policy, PluginError, UsageError
from kvpolicies.engine import calibration
from kvpolicies.corpus import calibration_text, python_documentation
from kvpolicies.engine.calibration import CalibratedWithoutText
from kvpolicies.experiments.probe import queries_and_keys
from kvpolicies_plugins.qfilters import main_directions

FEW = {"calibration_sequences": 2, "calibration_tokens": 64, "calibration_samples": 100_000}
"""Every position of two 64-token pieces: the calibration's queries are then all of them, in order."""


def test_the_filter_is_the_main_query_direction_turned_to_where_most_queries_point():
    generator = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    noise = 0.3 * torch.randn(2, 500, 16, generator=generator)
    queries = noise + torch.stack([3.0 * direction, -3.0 * direction])[:, None, :]  # head 1 points the other way
    found = main_directions(queries)
    torch.testing.assert_close(found[0], direction, atol=0.05, rtol=0)
    torch.testing.assert_close(found[1], -direction, atol=0.05, rtol=0)


def test_filters_come_from_an_svd_of_the_models_own_queries_on_the_calibration_pieces(tiny_model):
    with pytest.warns(CalibratedWithoutText):
        cache = CompressedCache(tiny_model, kvpolicies.get_policy("qfilters", **FEW), 0.5)
    pieces = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))  # no tokenizer: random ids
    recorded = [queries_and_keys(tiny_model, piece[None], rows=64)[0] for piece in pieces]
    for layer, filters in enumerate(cache.policy.calibrated):
        queries = torch.cat([found[layer][0] for found in recorded], dim=1)  # [heads, 128, head_dim]
        torch.testing.assert_close(filters, main_directions(queries), atol=1e-4, rtol=1e-4)
    assert cache.calibration_s > 0


def test_drawn_places_are_the_same_in_every_layer_and_come_from_every_piece(tiny_model):
    options = {"calibration_sequences": 3, "calibration_tokens": 40, "calibration_samples": 50}
    with pytest.warns(CalibratedWithoutText):
        found = calibration.Calibration(tiny_model).queries(3, 40, 50, seed=2)
    pieces = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(2))
    chosen = torch.randperm(120, generator=torch.Generator().manual_seed(2))[:50].sort().values
    recorded = [queries_and_keys(tiny_model, piece[None], rows=40)[0] for piece in pieces]
    for layer in (0, 7):
        every = torch.cat([found_in[layer][0] for found_in in recorded], dim=1)  # [heads, 120, head_dim]
        torch.testing.assert_close(found[layer], every[:, chosen], atol=1e-5, rtol=1e-5)
    assert len(found) == 8 and all(q.shape == (6, 50, 16) for q in found)
    assert kvpolicies.get_policy("qfilters", **options).config.calibration_samples == 50


def test_each_head_keeps_the_keys_that_project_furthest_on_its_groups_filter(tiny_model):
    with pytest.warns(CalibratedWithoutText):
        cache = CompressedCache(tiny_model, kvpolicies.get_policy("qfilters", **FEW), "10 tokens")
    plain = DynamicCache(config=tiny_model.config)
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        tiny_model(ids, cache=cache)
        tiny_model(ids, cache=plain)
    for layer in (0, 5):
        keys = plain.layers[layer].keys[0]  # [kv_heads, 30, head_dim]
        kept = cache.layers[layer].keys.split(cache.layers[layer].lengths)
        group = cache.policy.calibrated[layer].view(2, 3, -1).mean(1)  # 6 query heads over 2 KV heads
        for head in range(2):
            best = (keys[head] @ group[head]).topk(10).indices.sort().values
            torch.testing.assert_close(kept[head], keys[head][best])


def test_a_model_and_config_calibrate_once_whatever_the_number_of_caches(tiny_model, monkeypatch):
    runs = []
    original = calibration._queries
    monkeypatch.setattr(calibration, "_queries", lambda *args: runs.append(args) or original(*args))
    with pytest.warns(CalibratedWithoutText):
        first = CompressedCache(tiny_model, kvpolicies.get_policy("qfilters", **FEW), 0.5)
        second = CompressedCache(tiny_model, kvpolicies.get_policy("qfilters", **FEW), 0.25)
        assert len(runs) == 1 and second.calibration_s == first.calibration_s  # what it took, once
        assert second.policy.calibrated is first.policy.calibrated
        CompressedCache(tiny_model, kvpolicies.get_policy("qfilters", **FEW, seed=1), 0.5)
        assert len(runs) == 2  # another config, another calibration
        wrapped = CompressedCache(tiny_model, kvpolicies.get_policy("pyramidkv", scorer="qfilters",
                                                                    scorer_options=FEW), 0.5)
    assert len(runs) == 3  # a wrapper's config is another config
    assert wrapped.policy.scorer.calibrated is wrapped.policy.calibrated is not None  # its scorer reads it
    assert CompressedCache(tiny_model, kvpolicies.get_policy("snapkv"), 0.5).calibration_s == 0.0


def test_the_calibration_text_lies_beyond_every_haystack_of_up_to_8k_tokens():
    from kvpolicies_evals.data import haystack_text

    whole = python_documentation()
    assert haystack_text() == whole
    # A task's slice starts in the first half and spans at most 8 characters a token (evals/data.py).
    assert whole.index(calibration_text()) > len(whole) // 2 + 8 * 8192
    assert len(calibration_text()) > 100_000


def test_a_calibration_longer_than_its_text_says_how_much_there_is(tiny_model):
    from kvpolicies_evals.data import default_tokenizer

    policy = kvpolicies.get_policy("qfilters", calibration_sequences=1000, calibration_tokens=1024)
    with pytest.raises(UsageError, match=r"ask for at most \d+ pieces of 1024 tokens"):
        CompressedCache(tiny_model, policy, 0.5, tokenizer=default_tokenizer())


def test_a_failing_calibration_names_the_plugin_and_is_not_run_again_unless_memory_ran_out(tiny_model):
    calls = []

    class Broken(Policy):
        name = "broken-calibration"

        def calibrate(self, calibration):
            calls.append(self.name)
            raise RuntimeError("no text")

        def score(self, inputs):
            return inputs.valid.float()

    class OutOfMemory(Broken):
        name = "calibration-out-of-memory"

        def calibrate(self, calibration):
            calls.append(self.name)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    for _ in range(2):  # the second cache is told the same at once
        with pytest.raises(PluginError, match=r"raised RuntimeError in calibrate\(\): no text"):
            CompressedCache(tiny_model, Broken(), 0.5)
    assert calls == ["broken-calibration"]
    for _ in range(2):  # the machine's failure, not the plugin's: tried again, as more memory may be free
        with pytest.raises(torch.OutOfMemoryError):
            CompressedCache(tiny_model, OutOfMemory(), 0.5)
    assert calls == ["broken-calibration", *2 * ["calibration-out-of-memory"]]


def test_qfilters_without_a_calibration_refuses_to_score():
    from tests.helpers import score_inputs

    with pytest.raises(ValueError, match="not been calibrated"):
        kvpolicies.get_policy("qfilters").score(score_inputs(torch.randn(1, 2, 5, 4)))


def test_the_lm_eval_model_calibrates_on_text_before_any_request_and_records_its_time(tiny_pretrained, recwarn):
    from kvpolicies.integrations.lm_eval import KVPoliciesLM

    lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="qfilters", budget=0.5, calibration_sequences=2,
                      calibration_tokens=256)
    assert not [w for w in recwarn if issubclass(w.category, CalibratedWithoutText)]  # the tokenizer's text
    assert len(lm.kv_policy.calibrated) == 4
    assert lm.get_model_info()["kvpolicies"]["speed"]["calibration_s"] > 0
    assert lm.new_cache().policy.calibrated is lm.kv_policy.calibrated  # the caches find it done


def test_query_recordings_nest_change_no_output_and_leave_nothing_registered(tiny_model):
    """Was: a recording inside another called itself until Python's recursion limit."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from kvpolicies.engine.attention import RECORDER, recording_queries

    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        plain = tiny_model(ids).logits
        before = tiny_model.config._attn_implementation
        with recording_queries(tiny_model, lambda q: q[:, :, -1:].clone()) as outer:
            with recording_queries(tiny_model, lambda q: q[:, :, :2].clone()) as inner:
                nested = tiny_model(ids).logits
            after_inner = tiny_model(ids).logits
    assert torch.equal(nested, plain) and torch.equal(after_inner, plain)
    assert sorted(inner) == sorted(outer) == list(range(8))
    assert inner[3].shape[2] == 2 and outer[3].shape[2] == 1
    with torch.no_grad(), recording_queries(tiny_model, lambda q: q.clone()) as alone:
        tiny_model(ids)
    assert torch.equal(inner[3], alone[3][:, :, :2]) and torch.equal(outer[3], alone[3][:, :, -1:])
    assert tiny_model.config._attn_implementation == before
    assert not [name for name in ALL_ATTENTION_FUNCTIONS._global_mapping if name.startswith(RECORDER)]
