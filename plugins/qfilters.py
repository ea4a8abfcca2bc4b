"""Q-Filters, training-free (Godey et al. 2025, "Q-Filters: Leveraging QK Geometry for Efficient KV Cache
Compression", arXiv 2503.02812).

The paper observes that each head's queries share one main direction, the first right singular vector of its query
matrix, and that most queries project on it with one sign; a key's attention logit then moves with its own
projection on that direction, whatever the query. The direction, the head's "filter", is computed once per model on
calibration text. The published filters are downloads for a few models (kvpress loads them from a hub); here they are
computed from the embedded model's own queries on bundled text, as the paper's own script computes them.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvpolicies import Calibration, Policy, PolicyConfig, ScoreInputs, Signal, hookimpl


class QFiltersConfig(PolicyConfig):
    calibration_sequences: int = Field(8, ge=1, description="pieces of calibration text the model reads to fit the "
                                                            "filters (the paper's script: about 20)")
    calibration_tokens: int = Field(2048, ge=16, description="tokens per piece (the paper's script: 2048)")
    calibration_samples: int = Field(3000, ge=16, description="query positions drawn from the pieces for each "
                                                              "head's SVD (the paper's script: 3000)")
    seed: int = Field(0, description="seed of the drawn positions")


class QFilters(Policy):
    """Keep the keys that project furthest on their head's main query direction; attention-free, fitted once per model.

    A head's filter is the first right singular vector of its post-RoPE queries on calibration text, its sign turned
    so that most queries project positively on it, averaged over the query heads that share the KV head. A logit
    q·k carries the term (q·u)(k·u) along that direction u, positive in q·u for most queries, so the keys with the
    largest k·u are those most queries will attend to. The score reads only the keys: it runs next to any attention
    kernel, and is the same at prefill and while decoding.

    Departures, and why: the calibration text is the last third of the Python documentation bundled with CPython
    (:mod:`kvpolicies.engine.calibration`), not a pretraining corpus (none to be had offline), and 8 pieces of 2048
    tokens, not about 20, since the first direction of 3000 sampled queries is what the method keeps; the queries
    are those of the model in its own dtype, not under bfloat16 autocast.
    """

    name = "qfilters"
    Config = QFiltersConfig
    needs = frozenset({Signal.KEYS})

    def __init__(self, config: PolicyConfig | None = None, **options) -> None:
        super().__init__(config, **options)
        self._groups: dict[tuple, torch.Tensor] = {}
        self._groups_of: object = None

    def calibrate(self, calibration: Calibration) -> list[torch.Tensor | None]:
        """Per layer, ``[heads, head_dim]``: each query head's oriented main direction."""
        queries = calibration.queries(self.config.calibration_sequences, self.config.calibration_tokens,
                                      self.config.calibration_samples, self.config.seed)
        return [None if found is None else main_directions(found) for found in queries]

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        if self.calibrated is None:
            raise ValueError("qfilters scores keys against filters fitted to the model, and it has not been "
                             "calibrated; build its cache with CompressedCache(model, policy, budget), which does")
        filters = self.calibrated
        found = filters[inputs.layer_idx] if inputs.layer_idx < len(filters) else None
        if found is None:
            raise ValueError(f"qfilters has no filter for layer {inputs.layer_idx}: its attention did not run "
                             "while the model read the calibration text")
        return torch.einsum("bhsd,hd->bhs", inputs.keys.float(), self._group_filters(inputs, found))

    def _group_filters(self, inputs: ScoreInputs, found: torch.Tensor) -> torch.Tensor:
        """``[kv_heads, head_dim]`` float32 on the keys' device: the mean of each KV group's query-head filters,
        made once per fit and layer, not at every eviction (a decoding step would pay its launches)."""
        if self._groups_of is not self.calibrated:
            self._groups, self._groups_of = {}, self.calibrated
        kv_heads, device = inputs.keys.shape[1], inputs.keys.device
        key = (inputs.layer_idx, kv_heads, device)
        if key not in self._groups:
            self._groups[key] = found.to(device).float().view(kv_heads, -1, found.shape[-1]).mean(1)
        return self._groups[key]


def main_directions(queries: torch.Tensor) -> torch.Tensor:
    """``[heads, head_dim]``: per head, the first right singular vector of ``queries`` (``[heads, n, head_dim]``),
    turned so that most of the queries project positively on it."""
    direction = torch.linalg.svd(queries.float(), full_matrices=False).Vh[:, 0]  # [heads, head_dim]
    projected = torch.einsum("hnd,hd->hn", queries.float(), direction)
    sign = torch.where((projected > 0).float().mean(-1) > 0.5, 1.0, -1.0)
    return direction * sign[:, None]


@hookimpl
def register_policies(register):
    register(QFilters)
