"""KVzip: entries scored by the attention the model's repetition of its context gives them, chunk by chunk, one
top-k over every layer and head; a padded probe lets each prompt of a batch repeat its own context."""

from __future__ import annotations

import pytest
import torch

from kvpolicies import Budget, CompressedCache, Policy, get_policy
from kvpolicies.engine.stages import Prefilled
from kvpolicies.errors import PluginError, UsageError
from tests.helpers import tiny_llama


class Letters:
    """A stand-in tokenizer: one id per character (random-weight models have none)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        assert not add_special_tokens  # a prompt inside the context: no beginning-of-text token
        return [3 + ord(character) % 97 for character in text]


def prefill(model, cache, ids, mask=None):
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)  # a padded prompt starts at 0
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1:].argmax(-1)


def test_a_padded_probe_gives_each_prompt_what_its_probe_gives_alone():
    """Prompts of 40 and 28 tokens in one left-padded batch, probed with 7 and 4 tokens (right-padded to 7): each
    prompt's entries receive what they receive when that prompt and probe run alone."""
    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :12] = 0
    probes = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    probe_mask = torch.ones_like(probes, dtype=torch.bool)
    probe_mask[1, 4:] = False
    got = {}

    class Probing(Policy):
        name = "padded-probe-test"

        def __init__(self, probe, probe_mask=None):
            super().__init__()
            self.probe, self.probe_mask = probe, probe_mask

        def after_prefill(self, prefilled):
            got[self.probe.shape[0], self.probe.shape[1]] = received = prefilled.attention_from(
                self.probe, reduce="max", mask=self.probe_mask)
            return received

    batch = CompressedCache(model, Probing(probes, probe_mask), 0.5)
    prefill(model, batch, ids, mask)
    batch.after_prefill(model)
    together = got.pop((2, 7))
    for row, (length, probe) in enumerate(((40, probes[0:1]), (28, probes[1:2, :4]))):
        alone = CompressedCache(model, Probing(probe), 0.5)
        prefill(model, alone, ids[row:row + 1, 40 - length:])
        alone.after_prefill(model)
        by_itself = got.pop((1, probe.shape[1]))
        for layer_together, layer_alone in zip(together, by_itself):
            torch.testing.assert_close(layer_together[row, :, 40 - length:], layer_alone[0], atol=1e-5, rtol=0)
            assert not layer_together[row, :, :40 - length].any()  # the padding receives nothing


@pytest.mark.parametrize("mask", [torch.tensor([[1, 0, 1]]), torch.tensor([[0, 1, 1]]), torch.tensor([[1, 1]])])
def test_a_probe_mask_that_is_not_right_padding_is_refused(mask):
    class Probing(Policy):
        name = "bad-probe-mask-test"

        def after_prefill(self, prefilled):
            return prefilled.attention_from(torch.tensor([[5, 6, 7]]), mask=mask)

    model = tiny_llama()
    cache = CompressedCache(model, Probing(), 0.5)
    prefill(model, cache, torch.randint(3, 128, (1, 20)))
    with pytest.raises(PluginError, match="the mask must have the ids' shape"):
        cache.after_prefill(model)


def stub_prefilled(seen: list[int], heads: int = 2, layers: int = 2, encode=Letters().encode):
    """A Prefilled over left-padded dense layers whose probe records what it is asked and answers with each
    probe's length times 1000 plus the entry's column, so a score says which pass gave it."""
    from kvpolicies.engine.policy import ScoreInputs
    from kvpolicies.engine.selection import age_order

    width = max(seen)
    valid = torch.stack([torch.arange(width) >= width - n for n in seen])[:, None].expand(-1, heads, -1)
    views = [ScoreInputs(layer_idx=i, valid=valid, order=age_order(valid), seen_tokens=seen,
                         keep=torch.full((len(seen), heads), 4)) for i in range(layers)]
    ids = torch.stack([torch.arange(width) + 10 for _ in seen])
    asked = []

    def probe(probe_ids, reduce, mask):
        asked.append((probe_ids, mask))
        real = mask.sum(1)
        answer = real[:, None, None] * 1000.0 + torch.arange(width).float()
        return [answer.expand(-1, heads, -1).clone() for _ in range(layers)]

    return Prefilled(layers=views, budget=[8] * len(seen), ids=ids, context_tokens=seen, encode=encode,
                     _probe=probe), asked


def test_each_chunk_repeats_its_own_tokens_after_the_prompt_and_scores_only_its_own_entries():
    policy = get_policy("kvzip", chunk_tokens=8, overlap_tokens=3, prompt="R:", continuation="C:")
    prefilled, asked = stub_prefilled([20, 13])
    scores = policy.after_prefill(prefilled)
    assert len(asked) == 3  # 20 context tokens in chunks of 8: 3 passes
    first_ids, first_mask = asked[0]
    encode = Letters().encode
    # Row 0 (no padding): "R:" then its tokens 0..7 (ids 10..17); row 1 (7 padding): "R:" then its tokens 0..7.
    assert first_ids[0].tolist() == encode("R:") + list(range(10, 18)) and first_mask.all()
    assert first_ids[1].tolist() == encode("R:") + list(range(17, 25))
    # A later chunk: "C:", the last 3 tokens of the chunk before, a newline, then the chunk.
    second_row0 = asked[1][0][0].tolist()
    assert second_row0 == encode("C:") + [15, 16, 17] + encode("\n") + list(range(18, 26))
    # Row 1 has 13 tokens: its third pass has no chunk, so it repeats a token and its answer is not used.
    third_ids, third_mask = asked[2]
    assert third_mask[1].sum() == len(encode("R:")) + 1 and not third_mask[1, -1]  # right-padded
    probe_lengths = [mask.sum(1).tolist() for _, mask in asked]
    for layer in scores:
        for row, offset in ((0, 0), (1, 7)):
            for token in range(20 if row == 0 else 13):
                column = offset + token
                passed = probe_lengths[token // 8][row]
                assert layer[row, 0, column] == passed * 1000 + column  # from its own chunk's pass
        assert not layer[1, :, :7].any()  # padding: no score


def test_the_uniform_variant_keeps_the_same_share_of_every_head():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    uniform = CompressedCache(model, get_policy("kvzip", allocation="uniform", chunk_tokens=16), 0.25,
                              tokenizer=Letters())
    prefill(model, uniform, ids)
    uniform.after_prefill(model)
    assert set(uniform.kept_per_head().flatten().tolist()) == {10}  # a quarter of 40 in every head
    spread = CompressedCache(model, get_policy("kvzip", chunk_tokens=16), 0.25, tokenizer=Letters())
    prefill(model, spread, ids)
    spread.after_prefill(model)
    kept = spread.kept_per_head()
    assert kept.sum() == 160 and len(set(kept.flatten().tolist())) > 1  # layers and heads compete


def test_kvzip_keeps_the_budget_in_real_bytes_and_a_batch_keeps_what_each_prompt_keeps_alone():
    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :12] = 0
    policy = get_policy("kvzip", chunk_tokens=16)
    batch = CompressedCache(model, policy, 0.25, tokenizer=Letters())
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, cache=batch, max_new_tokens=4, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    stats = batch.stats()
    assert batch.resident_bytes() == stats.physical_bytes  # packed: nothing but the kept entries
    for row, length in ((0, 40), (1, 28)):
        alone = CompressedCache(model, policy, 0.25, tokenizer=Letters())
        with torch.no_grad():
            single = model.generate(ids[row:row + 1, 40 - length:], cache=alone, max_new_tokens=4, do_sample=False,
                                    output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        assert torch.equal(single.sequences[0, length:], out.sequences[row, 40:])
        torch.testing.assert_close(torch.stack(single.scores)[:, 0], torch.stack(out.scores)[:, row], atol=1e-4,
                                   rtol=0)
        assert torch.equal(alone.kept_per_head()[:, 0], batch.kept_per_head()[:, row])
        kept = batch.sequence_stats()[row]
        assert kept.kept_entries - kept.appended_entries == length * 16 // 4  # the budget: a quarter of the prompt


def test_at_the_full_budget_kvzip_gives_the_models_own_logits():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    cache = CompressedCache(model, get_policy("kvzip", chunk_tokens=16), 1.0, tokenizer=Letters())
    with torch.no_grad():
        ours = model.generate(ids, cache=cache, max_new_tokens=5, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=0)
        plain = model.generate(ids, max_new_tokens=5, do_sample=False, output_scores=True,
                               return_dict_in_generate=True, pad_token_id=0)
    torch.testing.assert_close(torch.stack(ours.scores), torch.stack(plain.scores), atol=1e-4, rtol=0)


def test_without_the_tokenizer_kvzip_repeats_the_context_bare_and_says_how_to_give_it():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    asked = []

    cache = CompressedCache(model, get_policy("kvzip", chunk_tokens=64), 0.25)
    prefill(model, cache, ids)
    original = cache._prober

    def prober(model):
        inner = original(model)
        return lambda probe_ids, reduce, mask: asked.append(probe_ids) or inner(probe_ids, reduce, mask)

    cache._prober = prober
    with pytest.warns(UserWarning, match=r"no tokenizer.*tokenizer=tokenizer"):
        cache.after_prefill(model)
    assert len(asked) == 1 and torch.equal(asked[0], ids)  # the context alone, repeated once
    assert cache.kept_per_head().sum() == 160 and cache.probe_tokens == 40


def test_a_question_kept_whole_is_neither_repeated_nor_scored():
    """Query-aware, the whole prompt is prefilled and its question (after the context split) kept whole: KVzip
    repeats the 30 context tokens only, and the budget is a quarter of them."""
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(6))
    cache = CompressedCache(model, get_policy("kvzip", chunk_tokens=64, prompt="R:"), 0.25, tokenizer=Letters())
    asked = []
    original = cache._prober
    cache._prober = lambda model: (lambda probe_ids, reduce, mask: asked.append(probe_ids) or original(model)(
        probe_ids, reduce, mask))
    cache.context_lengths = [30]
    prefill(model, cache, ids)
    cache.after_prefill(model)
    assert len(asked) == 1 and asked[0][0].tolist() == Letters().encode("R:") + ids[0, :30].tolist()
    stats = cache.stats()
    assert stats.kept_entries - stats.appended_entries == 30 * 16 // 4 and stats.appended_entries == 10 * 16


def test_a_prompt_cut_by_an_earlier_stage_is_refused_with_the_reason():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(7))
    cache = CompressedCache(model, get_policy("kvzip"), 0.25, tokenizer=Letters())
    prefill(model, cache, ids[:, :20])
    cache.after_prefill(model)  # as a log-likelihood streamed in chunks does after each chunk
    prefill(model, cache, ids[:, 20:])
    with pytest.raises(UsageError, match="cut by an earlier stage.*evaluate it on generation tasks") as raised:
        cache.after_prefill(model)
    assert not isinstance(raised.value, PluginError)  # the user's choice of task, not a fault of the plugin


def test_a_cache_reset_for_the_next_prompt_lets_kvzip_choose_again():
    model = tiny_llama()
    cache = CompressedCache(model, get_policy("kvzip"), 0.25, tokenizer=Letters())
    for seed in (8, 9):  # the second prompt is a first stage of its own, not a second cut of the first
        cache.reset()
        prefill(model, cache, torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(seed)))
        cache.after_prefill(model)
        assert cache.kept_per_head().sum() == 160


def test_the_dry_run_counts_kvzips_whole_prompt_and_its_second_pass():
    from kvpolicies.experiments.dry_run import (Device, Shape, _task_seconds, cell_memory, generation_seconds,
                                                prefill_seconds, workload)
    from kvpolicies.experiments.grid import SweepConfig, cells

    shape = Shape(layers=4, hidden=256, intermediate=1024, heads=4, kv_heads=2, head_dim=64, vocab=1000,
                  parameters=10**7, source="a test")
    device = Device(name="a test", flops_per_s=1e11, bandwidth_bytes_per_s=1e10, memory_bytes=2**34)
    config = SweepConfig.model_validate({"policies": ["snapkv", "kvzip"], "budgets": [0.25],
                                         "tasks": [{"name": "kvp_passkey", "metadata": {"lengths": [1024]}}]})
    full, snapkv, kvzip = sorted(cells(config), key=lambda cell: ["full", "snapkv", "kvzip"].index(cell.policy.name))
    work = workload(full)
    assert cell_memory(shape, kvzip, 1024, 12, 4, None)["kv"] == shape.kv_bytes(1036, 4)  # the whole prompt
    assert cell_memory(shape, snapkv, 1024, 12, 4, None)["kv"] < shape.kv_bytes(1036, 4) * 0.6  # a quarter + a layer
    prefill = prefill_seconds(shape, device, work)
    generation = sum(generation_seconds(shape, device, work, kept, 4) for kept in (1.0, 0.25, 0.25))
    group = [[full, snapkv, kvzip]]
    assert _task_seconds(shape, device, work, group, 4, together=False) == pytest.approx(2 * prefill + generation)


def test_the_selfchecks_chunked_prefill_is_skipped_for_a_stage_that_holds_the_prompt_until_it_chooses():
    from kvpolicies.experiments.selfcheck import Verdict, check_long_context

    result = check_long_context(tiny_llama(), None, 64, "kvzip", Budget.parse(0.25), chunk=16)
    assert result.verdict is Verdict.SKIPPED and "holding all of it" in result.measured
