"""Memory that follows the budget, not the vocabulary or the hidden size, and scoring that never waits on the device.

Peaks are measured on the CPU by a ``TorchDispatchMode`` that sees every tensor an aten op creates and when it dies,
so a test fails if a ``[context, vocab]`` logits matrix, a float32 copy of every key or a ``[..., seq, hidden]``
projection is ever allocated, whatever the machine's allocator does.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kvpolicies
from kvpolicies import CompressedCache
from kvpolicies.engine import signals
from kvpolicies.engine.selection import age_order
from kvpolicies.engine.signals import LogitScale, attention_received
from kvpolicies.integrations.lm_eval import KVPoliciesLM
from plugins import criticalkv
from plugins.criticalkv import projected_value_norms
from tests.helpers import attention_received_by_loops, score_inputs

HOST_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
              "unique_consecutive"}
"""aten ops that make the host wait for a CUDA device (``.item()``, ``int(t)``, ``bool(t)``, boolean indexing)."""


class Allocations(TorchDispatchMode):
    """Tensors created by aten ops inside the block: the peak of their live bytes (views of one storage count once;
    inputs made before the block count nothing), the largest one, and every op's name."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = self.peak_bytes = 0
        self.created: list[torch.Size] = []  # shapes of the new storages' tensors
        self.ops: list[str] = []
        self._holders: dict[int, int] = {}  # storage pointer -> live tensors on it
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.overloadpacket.__name__)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.untyped_storage().nbytes() == 0:
                continue
            pointer = tensor.untyped_storage().data_ptr()
            if pointer not in self._holders:
                if pointer in inputs:  # a view or an in-place result of a tensor made before the block
                    continue
                self._holders[pointer] = 0
                self._sizes[pointer] = tensor.untyped_storage().nbytes()
                self.created.append(tensor.shape)
                self.live_bytes += self._sizes[pointer]
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self._holders[pointer] += 1
            weakref.finalize(tensor, self._release, pointer)
        return out

    def _release(self, pointer: int) -> None:
        self._holders[pointer] -= 1
        if not self._holders[pointer]:
            del self._holders[pointer]
            self.live_bytes -= self._sizes.pop(pointer)

    def rows_of(self, width: int) -> int:
        """Most rows of any created tensor whose last dimension is ``width`` (the vocabulary, say)."""
        return max((shape.numel() // width for shape in self.created if len(shape) and shape[-1] == width), default=0)

    def host_syncs(self) -> list[str]:
        return [op for op in self.ops if op in HOST_SYNCS]


def test_allocations_sees_the_peak_of_live_tensors_not_their_sum():
    with Allocations() as seen:
        for _ in range(3):
            big = torch.ones(1000, 1000)  # 4 MB, freed when the next one replaces it
            view = big[:10]  # a view shares its storage: no new bytes
            del big, view
    assert seen.peak_bytes == 4_000_000
    assert seen.live_bytes == 0


# -- the lm-eval adapter: logits for the rows scored, never [context, vocab] ------------------------------------


def context_tokens(count: int) -> list[int]:
    return torch.randint(3, 1000, (count,), generator=torch.Generator().manual_seed(0)).tolist()


def full_logprobs(lm, tokens: list[int]) -> torch.Tensor:
    """What the adapter computed before: ``[len(tokens) - 1, vocab]`` float32 log-probs from every row of logits."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([tokens[:-1]]), cache=lm.new_cache()).logits
    return F.log_softmax(logits[0].float(), dim=-1)


def test_loglikelihood_computes_logits_only_for_the_continuation(tiny_pretrained):
    lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="full")
    vocab = lm.model.config.vocab_size
    tokens, continuation = context_tokens(301), 5
    with Allocations() as seen:
        [got] = lm._continuation_logprobs([(tokens, continuation)])
    assert seen.rows_of(vocab) <= continuation  # was 296: the whole context's logits, to keep its last row
    context_logits_bytes = (len(tokens) - continuation) * vocab * 4
    assert seen.peak_bytes < context_logits_bytes / 10
    torch.testing.assert_close(got, full_logprobs(lm, tokens)[-continuation:], rtol=1e-5, atol=1e-5)


def test_rolling_loglikelihood_holds_one_chunk_of_logits_and_scores_the_same(tiny_pretrained):
    lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="full", stream_chunk=64)
    vocab = lm.model.config.vocab_size
    tokens = context_tokens(300)
    for context_length in (1, 150):  # lm-eval's rolling windows (one prefix token), and a longer scored-apart context
        context, continuation = tokens[:context_length], tokens[context_length:]
        with Allocations() as seen:
            got = lm._streamed_logprob(context, continuation)
        assert seen.rows_of(vocab) <= 64  # was 299: every chunk's logits kept, concatenated, then made float
        chunk_logits_bytes = 64 * vocab * 4
        assert seen.peak_bytes < 2.5 * chunk_logits_bytes  # a chunk's logits and their log-softmax, at most
        want = full_logprobs(lm, tokens)[-len(continuation):].gather(1, torch.tensor(continuation)[:, None]).sum()
        assert got == pytest.approx(float(want), rel=1e-6)


def test_generation_computes_one_row_of_logits_per_step(tiny_pretrained):
    """transformers' ``generate`` asks for ``logits_to_keep=1``; the adapter must keep it that way."""
    lm = KVPoliciesLM(pretrained=tiny_pretrained, policy="snapkv", budget=0.5)
    context = torch.tensor([context_tokens(200)])
    with Allocations() as seen:
        lm._model_generate(context, max_length=204, stop=["never said"])
    assert seen.rows_of(lm.model.config.vocab_size) == 1


# -- criticalkv: ‖W_o v‖ in the Gram form ----------------------------------------------------------------------


def projected_norms_by_projection(values: torch.Tensor, output_projection: torch.Tensor) -> torch.Tensor:
    """The formula as first written: every ``W_o^(j) v`` materialised, ``[batch, kv_heads, groups, seq, hidden]``."""
    batch, kv_heads, seq, head_dim = values.shape
    weight = output_projection.float()
    groups = weight.shape[1] // head_dim // kv_heads
    weight = weight.view(weight.shape[0], kv_heads, groups, head_dim)
    return torch.einsum("bhsd,ohgd->bhgso", values.float(), weight).norm(dim=-1).mean(dim=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "kv_heads", "groups", "seq", "head_dim", "hidden"),
                         [(2, 2, 3, 50, 16, 96), (1, 4, 4, 200, 64, 512), (3, 1, 1, 7, 8, 8)])
def test_projected_value_norms_equal_the_norms_of_the_projections(dtype, batch, kv_heads, groups, seq, head_dim,
                                                                   hidden):
    generator = torch.Generator().manual_seed(seq)
    values = torch.randn(batch, kv_heads, seq, head_dim, generator=generator).to(dtype)
    output_projection = (torch.randn(hidden, kv_heads * groups * head_dim, generator=generator) / hidden**0.5).to(dtype)
    torch.testing.assert_close(projected_value_norms(values, output_projection),
                               projected_norms_by_projection(values, output_projection), rtol=1e-5, atol=1e-6)


def test_projected_value_norms_never_build_the_hidden_sized_projections():
    values = torch.randn(1, 2, 256, 16)
    output_projection = torch.randn(512, 6 * 16)
    with Allocations() as seen:
        projected_value_norms(values, output_projection)
    projections_bytes = 1 * 2 * 3 * 256 * 512 * 4  # [batch, kv_heads, groups, seq, hidden] float32
    assert seen.peak_bytes < projections_bytes / 20
    assert seen.peak_bytes <= 4 * values.numel() * 4  # a few value-sized temporaries


def kept_keys(cache: CompressedCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys each layer holds after compression, with their validity: which entries were kept."""
    views = (layer.dense_view(tracks=False) for layer in cache.layers)
    return [(keys.clone(), valid.clone()) for keys, _, valid in views]


def run_prompt(model, policy: str, budget=0.3, **options) -> CompressedCache:
    ids = torch.randint(3, 128, (2, 300), generator=torch.Generator().manual_seed(1))
    cache = CompressedCache(model, kvpolicies.get_policy(policy, **options), budget)
    with torch.no_grad():
        model(ids, cache=cache, logits_to_keep=1)
        for step in range(3):  # a few decoding steps: decode-time eviction past the slack
            model(ids[:, step : step + 1], cache=cache, logits_to_keep=1)
    return cache


def assert_same_entries(first: CompressedCache, second: CompressedCache) -> None:
    for (keys, valid), (other_keys, other_valid) in zip(kept_keys(first), kept_keys(second), strict=True):
        assert torch.equal(valid, other_valid)
        assert torch.equal(keys, other_keys)


def test_criticalkv_keeps_the_same_entries_as_with_the_projections(tiny_model, monkeypatch):
    gram = run_prompt(tiny_model, "criticalkv")
    monkeypatch.setattr(criticalkv, "projected_value_norms", projected_norms_by_projection)
    assert_same_entries(gram, run_prompt(tiny_model, "criticalkv"))


# -- attention_received: no float32 copy of every key, no host sync ---------------------------------------------


def attention_received_as_first_written(query, keys, valid, order, scaling, chunk=256, reduce="sum", window=None):
    """The signal as first written: every key upcast at once, and a device read per chunk of queries for its cut
    (a sum: what H2O's track takes; no sliding window, which this model has not)."""
    assert reduce == "sum" and window is None
    scale = scaling if isinstance(scaling, LogitScale) else LogitScale(scaling)
    batch, kv_heads, seq, head_dim = keys.shape
    heads, q_len = query.shape[1], query.shape[2]
    grouped = query.view(batch, kv_heads, heads // kv_heads, q_len, head_dim)
    first_new = valid.sum(-1, keepdim=True) - q_len
    received = torch.zeros(batch, kv_heads, seq)
    keys32 = keys.float()
    for start in range(0, q_len, chunk):
        stop = min(start + chunk, q_len)
        positions = (valid & (order <= first_new + stop - 1)).flatten(0, 1).any(0).nonzero()
        seen = int(positions[-1]) + 1 if len(positions) else 0
        dots = torch.einsum("bhgqd,bhsd->bhgqs", grouped[:, :, :, start:stop].float(), keys32[:, :, :seen])
        logits = scale.apply_(dots)
        limit = first_new + torch.arange(start, stop)
        visible = valid[:, :, None, :seen] & (order[:, :, None, :seen] <= limit[..., None])
        probs = logits.masked_fill(~visible[:, :, None], float("-inf")).softmax(dim=-1)
        received[..., :seen] += probs.nan_to_num(0.0).sum(dim=(2, 3))
    return received


def ragged_valid(batch: int, kv_heads: int, seq: int) -> torch.Tensor:
    """Left padding of different lengths per sequence, and holes (evicted entries) in every head."""
    valid = torch.rand(batch, kv_heads, seq, generator=torch.Generator().manual_seed(seq)) > 0.2
    valid[1, :, :37] = False
    valid[:, :, -5:] = True  # the newest entries (the queries' own) are held
    return valid


@pytest.mark.parametrize("q_len", [1, 40, 150])
def test_attention_received_equals_the_reference_with_holes_padding_and_many_chunks(q_len):
    generator = torch.Generator().manual_seed(q_len)
    keys = torch.randn(2, 2, 160, 8, generator=generator)
    query = torch.randn(2, 6, q_len, 8, generator=generator)
    valid = ragged_valid(2, 2, 160)
    valid[:, :, -q_len:] = True  # the queries' own entries
    got = attention_received(query, keys, valid, age_order(valid), 8**-0.5, chunk=16)
    torch.testing.assert_close(got, attention_received_by_loops(query, keys, 8**-0.5, valid), atol=1e-5, rtol=1e-5)
    first = attention_received_as_first_written(query, keys, valid, age_order(valid), 8**-0.5, chunk=16)
    torch.testing.assert_close(got, first, atol=1e-6, rtol=1e-6)


def test_attention_received_never_reads_the_device_back():
    keys = torch.randn(2, 2, 600, 16)
    query = torch.randn(2, 6, 600, 16)  # a prefill: three chunks of 256 queries
    valid = ragged_valid(2, 2, 600)
    valid[:, :, -600:] = True
    order = age_order(valid)
    with Allocations() as seen:
        attention_received(query, keys, valid, order, 16**-0.5)
    assert seen.host_syncs() == []  # was a nonzero and an int() per chunk


def test_attention_received_upcasts_narrow_keys_a_block_at_a_time(monkeypatch):
    monkeypatch.setattr(signals, "KEY_BLOCK", 64, raising=False)
    keys = torch.randn(1, 2, 1000, 64).bfloat16()
    query = torch.randn(1, 6, 1, 64).bfloat16()  # one decoding step (H2O scores every step)
    valid = torch.ones(1, 2, 1000, dtype=torch.bool)
    with Allocations() as seen:
        got = attention_received(query, keys, valid, age_order(valid), 64**-0.5)
    keys32_bytes = keys.numel() * 4  # what the float32 copy of every key took: 512 kB
    # the step's own [1, 2, 3, 1, 1000] logits and probabilities, plus one block of float32 keys at a time
    assert seen.peak_bytes < keys32_bytes / 4
    assert max(shape.numel() for shape in seen.created if len(shape) and shape[-1] == 64) <= 2 * 64 * 64
    want = attention_received_as_first_written(query, keys, valid, age_order(valid), 64**-0.5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "tova", "expected_attention"])
def test_attention_policies_keep_the_same_entries_as_with_the_first_signal(tiny_model, monkeypatch, policy):
    now = run_prompt(tiny_model, policy)
    from kvpolicies.engine import cache as cache_module, storage as storage_module

    for module in (cache_module, storage_module):
        monkeypatch.setattr(module, "attention_received", attention_received_as_first_written)
    assert_same_entries(now, run_prompt(tiny_model, policy))


# -- random: drawn on the entries' device, the same draws on the CPU ---------------------------------------------


def random_scores_as_first_written(seed: int, inputs) -> torch.Tensor:
    """CPU generator, a host copy of each row's ranks, then the scores moved to the entries' device."""
    batch, heads, seq = inputs.valid.shape
    scores = torch.empty(batch, heads, seq)
    for row, seen in enumerate(inputs.seen_tokens):
        generator = torch.Generator().manual_seed(hash((seed, inputs.layer_idx, seen)) % 2**62)
        draws = torch.rand(heads, max(seen, 1), generator=generator)
        scores[row] = draws.gather(1, inputs.order[row].clamp(min=0).cpu())
    return scores.to(inputs.valid.device)


@pytest.mark.parametrize("seed", [0, 7])
def test_random_draws_the_same_scores_on_the_cpu_as_before(seed):
    policy = kvpolicies.get_policy("random", seed=seed)
    keys = torch.randn(3, 2, 40, 4)
    valid = torch.ones(3, 2, 40, dtype=torch.bool)
    valid[1, :, :9] = valid[2, :, :20] = False  # left padding
    valid[:, 1, 25:30] = False  # entries evicted from one head
    for layer_idx in range(4):
        inputs = score_inputs(keys, valid=valid, layer_idx=layer_idx)
        assert torch.equal(policy.score(inputs), random_scores_as_first_written(seed, inputs))


def test_random_keeps_the_same_entries_in_a_cache_as_before(tiny_model, monkeypatch):
    now = run_prompt(tiny_model, "random", seed=3)
    policy_class = type(kvpolicies.get_policy("random"))
    monkeypatch.setattr(policy_class, "score", lambda self, inputs: random_scores_as_first_written(3, inputs))
    assert_same_entries(now, run_prompt(tiny_model, "random", seed=3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_random_scores_on_the_device_without_copies_to_the_host():
    keys = torch.randn(2, 2, 40, 4, device="cuda")
    inputs = score_inputs(keys, valid=torch.ones(2, 2, 40, dtype=torch.bool, device="cuda"))
    inputs.order = inputs.order.cuda()
    policy = kvpolicies.get_policy("random", seed=1)
    with Allocations() as seen:
        scores = policy.score(inputs)
    assert scores.device.type == "cuda"
    assert seen.host_syncs() == [] and "_to_copy" not in seen.ops
    assert torch.equal(scores, policy.score(inputs))  # same seed, same draws on one device
