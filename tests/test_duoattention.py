"""DuoAttention, training-free: heads classified from the prompt's own attention; retrieval heads keep everything,
streaming heads their sinks and recent window, as many retrieval heads as the budget pays for."""

from __future__ import annotations

import torch

from kvpolicies import CompressedCache, get_policy
from kvpolicies.engine.policy import ScoreInputs
from kvpolicies.engine.selection import age_order
from kvpolicies.engine.stages import Prefilled
from tests.helpers import tiny_llama


def view(keys: torch.Tensor, queries: torch.Tensor, layer: int = 0) -> ScoreInputs:
    valid = torch.ones(keys.shape[:3], dtype=torch.bool)
    return ScoreInputs(layer_idx=layer, valid=valid, order=age_order(valid), seen_tokens=[keys.shape[2]],
                       keep=torch.full(keys.shape[:2], 4), keys=keys, values=keys.clone(), queries=queries,
                       scaling=1.0)


def test_the_head_whose_queries_look_past_its_sinks_and_window_ranks_first():
    """Two layers of two KV heads (two query heads each), 40 entries: one head's last queries point at entry 20,
    outside what a streaming head keeps (4 sinks, 8 recent); the others' point at their sinks and recent entries."""
    torch.manual_seed(0)
    policy = get_policy("duoattention", sink_tokens=4, window_tokens=8, observation_tokens=4)
    layers = []
    for layer in range(2):
        keys = torch.randn(1, 2, 40, 16) * 0.1
        keys[0, :, 20] += torch.eye(16)[0] * 8  # a distant entry every head could look at
        keys[0, :, 1] += torch.eye(16)[1] * 8  # a sink
        queries = torch.zeros(1, 4, 4, 16)
        queries[..., 1] = 1.0  # every query head looks at the sink...
        if layer == 1:
            queries[0, 2:, :, 0], queries[0, 2:, :, 1] = 1.0, 0.0  # ...but layer 1's second KV head looks far
        layers.append(view(keys, queries, layer))
    prefilled = Prefilled(layers=layers, budget=[100], ids=None, context_tokens=[40])
    scores = policy.after_prefill(prefilled)
    ranks = [[int(score[0, head].floor().unique().item()) for head in range(2)] for score in scores]
    assert ranks[1][1] == 3  # the retrieval head ranks above every other
    within = scores[1][0, 1]
    assert torch.equal(within.argsort(), torch.arange(40))  # inside a head, the newest entries first
    shares = [policy._lost_by_streaming(inputs, [40]) for inputs in layers]
    assert shares[1][0, 1] > 0.9 and max(shares[0].max(), shares[1][0, 0]) < 0.05


def test_a_questions_queries_see_the_whole_context_and_the_contexts_own_see_up_to_themselves():
    """Queries pointing at the context's last entry: the context's own last queries, but the newest, cannot see
    it and spread their attention outside the sinks and window; a question's queries, after the context, all
    see it, inside the window. Computed in chunks of two queries or all at once, the same."""
    torch.manual_seed(1)
    policy = get_policy("duoattention", sink_tokens=4, window_tokens=8, observation_tokens=4)
    keys = torch.randn(1, 1, 40, 16) * 0.1
    keys[0, 0, 39] += torch.eye(16)[0] * 8
    queries = torch.zeros(1, 2, 4, 16)
    queries[..., 0] = 1.0
    own = view(keys, queries)
    asked = ScoreInputs(**{**vars(own), "seen_tokens": [50]})  # a 10-token question follows the context
    lost_own, lost_asked = policy._lost_by_streaming(own, [40]), policy._lost_by_streaming(asked, [40])
    assert lost_own[0, 0] > 0.5 and lost_asked[0, 0] < 0.05
    assert torch.allclose(policy._lost_by_streaming(own, [40], chunk=2), lost_own)


@torch.no_grad()
def test_retrieval_heads_keep_everything_streaming_heads_their_sinks_and_window_within_the_budget():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 96), generator=torch.Generator().manual_seed(2))
    policy = get_policy("duoattention", sink_tokens=4, window_tokens=12, observation_tokens=8)
    cache = CompressedCache(model, policy, 0.4)
    first = model(ids, cache=cache).logits[:, -1:].argmax(-1)
    model(first, cache=cache)  # the stage runs before the first decoding step
    kept = cache.kept_per_head()[:, 0]  # [layers, kv_heads]
    context = kept - 1  # the decoded token is kept whole, outside the budget
    whole, streaming = (context == 96).sum().item(), (context == 16).sum().item()
    assert whole >= 1 and streaming >= 1 and whole + streaming >= kept.numel() - 1  # one head may be cut between
    stats = cache.stats()
    assert stats.resident_bytes == stats.physical_bytes
    assert context.sum().item() <= 0.4 * 96 * kept.numel()  # the budget, in entries of the context
