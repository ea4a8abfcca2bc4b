"""KVzip (Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv 2505.23416).

A query-agnostic method of another shape than score-then-evict: once the context is in, the model is asked to
repeat it, and an entry is worth keeping by how much attention the repetition gives it. It runs as an after-prefill
stage (:mod:`kvpolicies.engine.stages`), so it sees every layer at once and may run the model.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from pydantic import Field

from kvpolicies import Policy, PolicyConfig, UsageError, hookimpl
from kvpolicies.engine.stages import Prefilled


class KVzipConfig(PolicyConfig):
    sink_tokens: int = Field(4, ge=0, description="first real tokens of each head always kept (the paper's sinks)")
    chunk_tokens: int = Field(2048, ge=1, description="context tokens repeated per reconstruction pass")
    allocation: Literal["global", "uniform"] = Field(
        "global", description="global: one top-k over every layer and head (KVzip); uniform: each head keeps its "
                              "own best share (the paper's uniform-head variant)")
    prompt: str = Field("\n\nRepeat the previous context exactly.\n",
                        description="what precedes the first chunk's repetition")
    continuation: str = Field("\n\nRepeat the part of the previous context exactly, starting with",
                              description="what precedes a later chunk's repetition, followed by the last "
                                          "overlap_tokens of the chunk before it and a newline")
    overlap_tokens: int = Field(8, ge=0, description="tokens of the previous chunk that start a later chunk's prompt")


class KVzip(Policy):
    """Keep the entries the model attends to most when asked to repeat its context.

    For each chunk of ``chunk_tokens`` context tokens, the model reads the repeat prompt and then the chunk again
    (teacher-forced), after the whole cached context; an entry of the chunk scores the largest attention it gets
    from any of those tokens and any query head of its KV group. One top-k over every layer and head then keeps
    the budget (``allocation="uniform"``: each head its own best share). Each sequence of a batch repeats its own
    context, padded to the longest probe, so a batch keeps what each prompt keeps alone.

    Departures, and why: the softmax runs over the whole cache, the stage's one definition of attention received
    (kvpress normalises over the sinks, the chunk and the repetition only); prompts are plain text, as lm-eval gives
    them, so the repeat prompt is not wrapped in a chat template; the extra passes cost about one more prefill,
    counted in the cell's time. A perplexity task streams its document in chunks and cuts after each: KVzip, which
    scores a context once with every token in place, refuses the second cut (the cell fails saying so).
    """

    name = "kvzip"
    Config = KVzipConfig
    stage_ignores_budget = True  # the scores rank entries whatever the budget
    _warned = False

    def after_prefill(self, prefilled: Prefilled) -> list[torch.Tensor | None]:
        if prefilled.ids is None:
            raise UsageError("KVzip repeats the prompt's tokens, and the model was given embeddings: give it "
                             "input_ids")
        if not prefilled.first:
            raise UsageError("KVzip scores a context once, every token in place; this prompt was cut by an "
                             "earlier stage (a log-likelihood streamed in chunks, as perplexity tasks run), which "
                             "KVzip does not define: evaluate it on generation tasks")
        encode = prefilled.encode
        if encode is None:
            encode = _no_words
            if not self._warned:
                self._warned = True
                warnings.warn("kvzip: the cache has no tokenizer, so the context is repeated without KVzip's "
                              "instruction; build it with CompressedCache(model, policy, budget, "
                              "tokenizer=tokenizer) for the method as published", KVzipWithoutPrompt, stacklevel=2)
        views = [inputs for inputs in prefilled.layers if inputs is not None]
        if not views:  # every layer a window held whole: nothing to choose
            return [None] * len(prefilled.layers)
        seen, width = views[0].seen_tokens, prefilled.ids.shape[1]
        contexts = [prefilled.ids[row, width - n:width - n + context]
                    for row, (n, context) in enumerate(zip(seen, prefilled.context_tokens))]
        scores = [None if inputs is None else torch.zeros(inputs.valid.shape, dtype=torch.float32,
                                                          device=inputs.valid.device)
                  for inputs in prefilled.layers]
        size = self.config.chunk_tokens
        for start in range(0, max(prefilled.context_tokens), size):
            ids, mask = self._probe(contexts, start, encode)
            received = prefilled.attention_from(ids, reduce="max", mask=mask)
            for layer, (attention, inputs) in enumerate(zip(received, prefilled.layers)):
                if inputs is not None:  # each entry takes the attention of the pass that repeated it
                    index = _token_index(inputs, prefilled.context_tokens)
                    chunk = inputs.valid & (index >= start) & (index < start + size)
                    scores[layer] = torch.where(chunk, attention, scores[layer])
        if self.config.allocation == "uniform":
            return [None if score is None else _share_of_head(score, inputs, prefilled.context_tokens,
                                                              self.protected)
                    for score, inputs in zip(scores, prefilled.layers)]
        return scores

    def _probe(self, contexts: list[torch.Tensor], start: int, encode) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's repeat prompt and chunk from ``start``, right-padded to one length; a sequence whose
        context ends before ``start`` repeats its last token (its scores from this pass are not used)."""
        probes = []
        for context in contexts:
            chunk = context[start:start + self.config.chunk_tokens]
            if start == 0 or not len(chunk):
                prompt = _ids(encode, self.config.prompt, context)
            else:
                overlap = context[max(0, start - self.config.overlap_tokens):start]
                prompt = torch.cat([_ids(encode, self.config.continuation, context), overlap,
                                    _ids(encode, "\n", context)])
            probes.append(torch.cat([prompt, chunk if len(chunk) else context[-1:]]))
        longest = max(len(probe) for probe in probes)
        ids = torch.stack([torch.cat([probe, probe.new_zeros(longest - len(probe))]) for probe in probes])
        mask = torch.stack([torch.arange(longest, device=probe.device) < len(probe) for probe in probes])
        return ids, mask


class KVzipWithoutPrompt(UserWarning):
    """KVzip ran without the model's tokenizer: its repetition had no instruction before it."""


def _no_words(text: str) -> list[int]:
    return []


def _ids(encode, text: str, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(encode(text), dtype=like.dtype, device=like.device)


def _token_index(inputs, context_tokens: list[int]) -> torch.Tensor:
    """Each entry's place among its sequence's context tokens (0 the oldest), ``[batch, kv_heads, seq]``: at the
    first stage every context token is held but those a sliding window dropped, always the oldest, so it is the
    entry's age rank shifted by them."""
    context = torch.tensor(context_tokens, device=inputs.valid.device)[:, None, None]
    return inputs.order + (context - inputs.valid.sum(-1, keepdim=True))


def _share_of_head(score: torch.Tensor, inputs, context_tokens: list[int],
                   protected: tuple[int, int]) -> torch.Tensor:
    """Scores that rank an entry by its place within its own head, as a share of the head's entries the framework
    does not keep anyway (sinks, the recent window, the newest): a top-k over all heads then takes the same share of
    every head."""
    index, valid = _token_index(inputs, context_tokens), inputs.valid
    context = torch.tensor(context_tokens, device=valid.device)[:, None, None]
    sinks, window = protected
    kept_anyway = valid & ((index < sinks) | (index >= context - max(window, 1)))
    ranked = score.masked_fill(~valid, float("-inf")).masked_fill(kept_anyway, float("inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    place = torch.empty_like(order).scatter_(-1, order, torch.arange(score.shape[-1], device=score.device)
                                             .expand_as(order))
    place = place - kept_anyway.sum(-1, keepdim=True)  # 0 for each head's best entry left to choose
    share = -(place.float() + 1) / (valid & ~kept_anyway).sum(-1, keepdim=True).clamp(min=1)
    return share.masked_fill(kept_anyway, 1.0)


@hookimpl
def register_policies(register):
    register(KVzip)
