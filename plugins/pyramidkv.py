"""PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
arXiv 2406.02069)."""

from __future__ import annotations

import torch
from pydantic import Field

from kvpolicies import Allocation, hookimpl
from kvpolicies.engine.composition import ScorerWrapper, WrapperConfig


class PyramidKVConfig(WrapperConfig):
    scorer: str = Field("snapkv", description="policy whose score() ranks entries (the paper: SnapKV)")
    beta: float = Field(20.0, gt=1, description="average layer share / top layer share: higher is steeper")


class PyramidKV(ScorerWrapper):
    """Give lower layers more entries and upper layers fewer (a linear pyramid), scoring within layers with SnapKV.

    Layer shares fall linearly from ``2·avg − avg/beta`` at the first layer to ``avg/beta`` at the last, where
    ``avg`` is the uniform share, so the total equals the uniform allocation exactly; a layer that would get more
    than the sequence is capped and its excess goes to the others. Within a layer, heads share evenly and entries
    are ranked by ``scorer`` (SnapKV by default, as in the paper; any policy works). The scorer's own allocation,
    if any, is replaced.
    """

    name = "pyramidkv"
    Config = PyramidKVConfig

    def allocate(self, allocation: Allocation) -> Allocation:
        # Shares relative to the average layer: from 2 - 1/beta at the bottom to 1/beta at the top, over the layers
        # a policy may move entries between (windows held whole keep theirs; redistribute() caps a shared window
        # at what it can hold, its W - 1 and a grouped codec's hidden entries).
        free = allocation.free_layers
        top = 1 / self.config.beta
        per_layer = torch.linspace(2 - top, top, len(free)) if len(free) > 1 else torch.ones(len(free))
        weights = torch.zeros(allocation.tokens.shape, dtype=torch.double)
        weights[free] = per_layer[:, None].double()
        return allocation.redistribute(weights)


@hookimpl
def register_policies(register):
    register(PyramidKV)
