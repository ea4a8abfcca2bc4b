"""Several caches decoded as one batch: each row a sequence with a cache of its own (its policy, budget and codec).

Why: once a prompt's prefill is shared (:mod:`kvpolicies.engine.replay`), its cells differ only in their caches,
and decoding their answers one cell after another reads every weight of the model once per token per cell: at
batch one that is most of a decoding step's cost, on a CPU and on a GPU alike. Decoded together, one forward pass
per step serves every row (the projections and MLPs run over N rows for about the price of one), and each layer's
attention reads each row's own cache (:func:`~kvpolicies.engine.attention.kvpolicies_attention`): its own packed
runs, and its own cut after the attention, through the same calls a forward over that cache alone makes. A row
leaves the batch as soon as it stops, so its cache ends where it would alone.

What is and is not the same as alone. Each cache sees the calls it sees alone (``update``, its attention,
``after_attention``, the after-prefill stage and the recorded ids before each forward), so what it keeps follows its
own tokens. The tokens come from a forward over N rows, whose matrix products may round differently from a forward
over one (kernels block by batch size): where two tokens' logits nearly tie, a row may choose the other one, and
from there its answer differs. How often is measured (docs/performance.md), not assumed; decode one cache at a time
where bit-for-bit equality with a run alone matters.

Greedy only: the next token is the argmax of the last logits in float32, as ``generate`` chooses with no logits
processor. Rows are read one cache at a time inside each layer (N attention calls per layer, where a run alone
makes one); the rest of the step is one call for all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import Cache

from kvpolicies.engine.cache import CompressedCache
from kvpolicies.engine.stages import before_forward
from kvpolicies.engine.storage import RowLayers, hand_over


class CacheRows(Cache):
    """``caches`` (one sequence each, none of them padded) as the rows of one batch, in order.

    The model asks the cache for mask sizes and the sequence length: it gets the first row's. The rows are
    decoded in step (their logical lengths are equal), and the kvpolicies attention reads no mask for them.
    """

    def __init__(self, caches: Sequence[CompressedCache]) -> None:
        self.caches = list(caches)
        if not self.caches:
            raise ValueError("CacheRows needs at least one cache")
        super().__init__(layers=list(self.caches[0].layers))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's new keys and values into its own cache; the attention claims them all together."""
        if key_states.shape[2] != 1:
            raise ValueError("caches decoded together take one new token per forward pass")
        returned = [cache.update(key_states[row : row + 1], value_states[row : row + 1], layer_idx, *args, **kwargs)
                    for row, cache in enumerate(self.caches)]
        rows = RowLayers(tuple(self.caches), tuple(cache.layers[layer_idx] for cache in self.caches),
                         tuple(keys for keys, _ in returned), tuple(values for _, values in returned))
        hand_over(self, rows, key_states)
        return key_states, value_states


@torch.no_grad()
def decode_together(model, caches: Sequence[CompressedCache], sequences: Sequence[torch.Tensor], max_length: int,
                    stops: Callable[[int, torch.Tensor], bool],
                    step_done: Callable[[list[int], float, dict[int, float]], None] | None = None,
                    clock: Callable[[], float] | None = None) -> list[torch.Tensor]:
    """Greedy decoding of every ``sequences[i]`` (``[1, length]``: a prompt and the tokens chosen so far, all but
    the last in ``caches[i]``) until ``stops(i, sequence)`` says it is done after a new token, or it reaches
    ``max_length`` tokens. Returns the sequences, each as long as it grew.

    ``step_done(rows, seconds, own)`` is told, after each step, which rows it decoded, how long the step's forward
    took for all of them, and, per row, the seconds of work that row's cache did alone before it (an after-prefill
    stage, a cost of its policy only); read with ``clock``, which must wait for the device's queued work."""
    sequences = list(sequences)
    if len(sequences) != len(caches):
        raise ValueError(f"{len(sequences)} sequences for {len(caches)} caches: give one cache per sequence")
    active = [row for row, sequence in enumerate(sequences) if sequence.shape[1] < max_length]
    started = clock() if clock is not None else 0.0
    while active:
        ids = torch.cat([sequences[row][:, -1:] for row in active])
        own: dict[int, float] = {}
        for row, new in zip(active, ids):
            if clock is not None and caches[row].policy.has_stage and caches[row].stage_due(1):
                before_forward(caches[row], model, new[None], 1)
                now = clock()
                own[row], started = now - started, now
            else:
                before_forward(caches[row], model, new[None], 1)
        positions = torch.tensor([[caches[row].get_seq_length()] for row in active], device=ids.device)
        output = model(ids, cache=CacheRows([caches[row] for row in active]), position_ids=positions, use_cache=True,
                       logits_to_keep=1)
        chosen = output.logits[:, -1, :].to(torch.float32).argmax(dim=-1, keepdim=True)
        for index, row in enumerate(active):
            sequences[row] = torch.cat([sequences[row], chosen[index : index + 1]], dim=1)
        decoded = active
        active = [row for row in active if sequences[row].shape[1] < max_length and not stops(row, sequences[row])]
        if step_done is not None:
            now = clock() if clock is not None else 0.0
            step_done(decoded, now - started, own)
            started = now
    return sequences
