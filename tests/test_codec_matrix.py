"""Every registered codec on every family of the architecture matrix: the contract the budget and the pages rely on.

A codec is tested in depth on the tiny Llama (``test_codecs.py``, ``test_grouped_codecs.py``); here each one runs on
every family, with snapkv evicting: the budget holds in bytes and resident bytes are what the codec stores, 8 bits at
the full budget stay close to the model's own logits, and a left-padded batch decodes each prompt as alone. Prompts
of 200 tokens, longer than KIVI's residual of 128, so its groups really are encoded; on the models that slide a
window of 8, a window's entries are all among KIVI's newest (``test_grouped_codecs.py`` slides whole groups out).
"""

from __future__ import annotations

import pytest
import torch

import kvpolicies
from kvpolicies import Budget, CompressedCache
from kvpolicies.engine.codecs import GroupedCodec
from tests.architectures import COMMON, architecture, model  # noqa: F401 (fixtures)

CODECS = [info.name for info in kvpolicies.list_codecs() if info.name != "full"]
LOGIT_TOLERANCE = 0.01
"""int8 at the full budget: ``max |Δlogit|`` at most this share of the largest logit (a code is a 255th of its
entry's range, and two layers add little to that)."""


def ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, COMMON["vocab_size"], (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("codec", CODECS)
def test_the_budget_holds_in_bytes_and_resident_bytes_are_what_the_codec_stores(model, codec):
    cache = CompressedCache(model, "snapkv", Budget(value=0.25, slack_tokens=0), codec=codec)
    plain = CompressedCache(model, "snapkv", Budget(value=0.25, slack_tokens=0))
    prompt = ids(200)
    logits = model(prompt, cache=cache).logits[:, -1]
    model(prompt, cache=plain)
    stored = kvpolicies.get_codec(codec)
    per_head = 0.25 * cache.stats().full_entries / cache.shape.cells
    if isinstance(stored, GroupedCodec) and stored.most_at_full_precision >= per_head:
        # KIVI's residual (128 to 159 entries a head at full precision) is more than this budget's 50 a head, and
        # ThinK's more than the 2 of a model whose every window holds 7: they evict at full precision, as they
        # would, and keep what full precision keeps.
        assert cache.stats().kept_entries == plain.stats().kept_entries
    else:
        assert cache.stats().kept_entries > plain.stats().kept_entries  # the same bytes buy more entries
    for _ in range(4):
        stats = cache.stats()
        assert stats.resident_bytes == stats.physical_bytes  # read from the stored tensors
        rounding = cache.shape.cells * cache.shape.entry_bytes  # an entry a head
        assert stats.resident_bytes <= 0.25 * stats.full_bytes + rounding
        assert torch.isfinite(logits).all()
        logits = model(logits.argmax(-1, keepdim=True), cache=cache).logits[:, -1]


@torch.no_grad()
def test_eight_bits_at_the_full_budget_stay_close_to_the_models_own_logits_and_four_bits_further(model):
    prompt, following = ids(200), torch.tensor([[7, 11, 13]])
    plain = model(torch.cat([prompt, following], 1)).logits[:, -3:]
    error = {}
    for codec in ("int8", "int4"):
        cache = CompressedCache(model, "full", 1.0, codec=codec)
        model(prompt, cache=cache)
        error[codec] = float((model(following, cache=cache).logits - plain).abs().max())
    assert 0 < error["int8"] <= LOGIT_TOLERANCE * float(plain.abs().max()), error
    assert error["int8"] < error["int4"], error  # a codec that stored nothing lossy would tie


@torch.no_grad()
@pytest.mark.parametrize("codec", CODECS)
def test_a_left_padded_batch_decodes_each_prompt_as_alone(model, codec):
    long, short = ids(200, seed=3), ids(160, seed=4)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 40, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 200), torch.cat([torch.zeros(1, 40), torch.ones(1, 160)], 1)]).long()

    def decode(prompt, attention_mask) -> tuple[CompressedCache, torch.Tensor]:
        cache = CompressedCache(model, "snapkv", Budget(value=0.4, slack_tokens=0), codec=codec)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        steps = [model(prompt, attention_mask=attention_mask, position_ids=positions, cache=cache).logits[:, -1]]
        for step in range(3):
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(prompt), 1)], 1)
            positions = positions[:, -1:] + 1
            token = torch.full((len(prompt), 1), 5 + step)
            steps.append(model(token, attention_mask=attention_mask, position_ids=positions, cache=cache).logits[:, -1])
        return cache, torch.stack(steps, 1)

    batched, together = decode(batch, mask)
    for row, prompt in enumerate((long, short)):
        alone, own = decode(prompt, torch.ones_like(prompt))
        assert torch.equal(batched.kept_per_head()[:, row], alone.kept_per_head()[:, 0])
        # A last-bit difference between the batch's kernels and one prompt's can flip a code: a 15th of an entry's
        # range at 4 bits, which the logits of two layers carry at about that scale.
        tolerance = 1e-4 if codec in ("int8", "think") else 2e-2 * max(1.0, float(own.abs().max()))
        torch.testing.assert_close(together[row], own[0], atol=tolerance, rtol=1e-4)
