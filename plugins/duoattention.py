"""DuoAttention, training-free (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval
and Streaming Heads", arXiv 2410.10819).

Heads of two kinds: retrieval heads keep the whole context, streaming heads only their attention sinks and recent
tokens. The paper learns which head is which by optimising a gate per head on synthetic passkey data; those
patterns are downloads (for a few 7–8B models), not to be had here and not made for this model. So each head is
classified from the prompt itself, by the quantity the paper's training minimises: how much of its attention a
streaming head would lose.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvpolicies import Policy, PolicyConfig, hookimpl
from kvpolicies.engine.stages import Prefilled


class DuoAttentionConfig(PolicyConfig):
    sink_tokens: int = Field(64, ge=0, description="first tokens every head keeps (a streaming head's sinks; "
                                                   "the paper's 64)")
    window_tokens: int = Field(256, ge=0, description="most recent tokens every head keeps (a streaming head's "
                                                      "recent window; the paper's 256)")
    observation_tokens: int = Field(64, ge=1, description="last prompt queries whose attention classifies the "
                                                          "heads")


class DuoAttention(Policy):
    """Keep whole the heads whose attention reaches past their sinks and recent window; the rest stream.

    A head's retrieval score is the share of the attention its last ``observation_tokens`` prompt queries give to
    entries a streaming head would drop (neither among the first ``sink_tokens`` nor the last ``window_tokens``),
    summed over the query heads that share it. Every head keeps its sinks and recent window; the rest of the budget
    goes to whole heads, the highest scores first, over every layer at once (an after-prefill stage), and the last
    head it reaches keeps its newest entries. The budget is the lever: what the paper sets as a ratio of streaming
    heads follows here from the bytes, the same for every policy compared.

    Departures, and why: the heads are classified per prompt from its own attention (training-free; kvpress's
    ``on_the_fly_scoring`` classifies them once per model from mean queries and keys of calibration text, and the
    paper's gates are trained); a head either keeps everything or streams, but the last head the budget reaches is
    cut in between. Under ``query_aware`` the observing queries are the question's, as with SnapKV.
    """

    name = "duoattention"
    Config = DuoAttentionConfig
    stage_ignores_budget = True  # the scores rank entries whatever the budget

    @property
    def query_window(self) -> int:
        return self.config.observation_tokens

    def after_prefill(self, prefilled: Prefilled) -> list[torch.Tensor | None]:
        views = [inputs for inputs in prefilled.layers if inputs is not None]
        if not views:  # every layer a window held whole: nothing to choose
            return [None] * len(prefilled.layers)
        shares = [None if inputs is None else self._lost_by_streaming(inputs, prefilled.context_tokens)
                  for inputs in prefilled.layers]
        # Heads ranked per sequence over every layer: an integer rank per head, then the entry's recency within
        # its head (below 1), so a top-k over all entries fills whole heads in order, the newest first.
        found = torch.stack([share for share in shares if share is not None])  # [layers, batch, kv_heads]
        order = found.permute(1, 0, 2).flatten(1).argsort(dim=-1, stable=True)  # lowest share first
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                                .expand_as(order))
        rank = rank.view(found.shape[1], found.shape[0], found.shape[2]).permute(1, 0, 2).float()
        scores, index = [], 0
        for inputs in prefilled.layers:
            if inputs is None:
                scores.append(None)
                continue
            count = inputs.valid.sum(-1, keepdim=True).clamp(min=1)
            recency = 0.5 * inputs.order.clamp(min=0).float() / count
            scores.append((rank[index][..., None] + recency).masked_fill(~inputs.valid, 0.0))
            index += 1
        return scores

    def _lost_by_streaming(self, inputs, context_tokens: list[int], chunk: int = 16) -> torch.Tensor:
        """``[batch, kv_heads]``: the share of the observing queries' attention that lands on entries a streaming
        head drops. The queries are the context's own last ones (each sees the entries up to itself), or, where a
        question follows the context, the question's (they see the whole context). Queries run ``chunk`` at a time,
        so memory stays O(chunk × seq)."""
        queries = inputs.queries
        if queries is None:
            raise ValueError("duoattention classifies heads by their last queries, and none were kept for this "
                             "layer; it needs the queries of the prompt's forward pass")
        batch, kv_heads, seq, head_dim = inputs.keys.shape
        window = queries.shape[-2]
        grouped = queries.view(batch, kv_heads, -1, window, head_dim)
        keys = inputs.keys.float()
        held = inputs.valid.sum(-1, keepdim=True)  # [batch, kv_heads, 1]
        after = torch.tensor([seen > context for seen, context in zip(inputs.seen_tokens, context_tokens)],
                             device=held.device)[:, None, None]  # a question's queries, past the context
        first = torch.where(after, held, held - window)  # query j of the window sees age ranks up to first + j
        received = torch.zeros(batch, kv_heads, seq, dtype=torch.float32, device=keys.device)
        for start in range(0, window, chunk):
            stop = min(start + chunk, window)
            logits = torch.einsum("bhgqd,bhsd->bhgqs", grouped[:, :, :, start:stop].float(), keys) * inputs.scaling
            if inputs.softcap:
                logits = torch.tanh(logits / inputs.softcap) * inputs.softcap
            limit = first + torch.arange(start, stop, device=held.device)  # [batch, kv_heads, queries]
            visible = inputs.valid[:, :, None, :] & (inputs.order[:, :, None, :] <= limit[..., None])
            probs = logits.masked_fill_(~visible[:, :, None], float("-inf")).softmax(dim=-1).nan_to_num_(0.0)
            received += probs.sum(dim=(2, 3))
        sinks, recent = self.protected
        kept = (inputs.order < sinks) | (inputs.order >= held - recent)
        lost = received.masked_fill(kept | ~inputs.valid, 0.0).sum(-1)
        return lost / received.sum(-1).clamp(min=1e-30)


@hookimpl
def register_policies(register):
    register(DuoAttention)
