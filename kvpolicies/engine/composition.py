"""Policies built on another policy's scores: allocation shapes (pyramid, head-level) around any scorer.

A wrapper is configured, not coded: ``get_policy("pyramidkv", scorer="l2norm", scorer_options={...})``. It scores
with the inner policy, reads what the inner policy reads, protects what either protects, and replaces only the
budget's shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from kvpolicies.engine.policy import (
    Policy,
    PolicyConfig,
    PolicyConfigError,
    ScoreInputs,
)

if TYPE_CHECKING:
    from kvpolicies.engine.calibration import Calibration


class WrapperConfig(PolicyConfig):
    """Options of every wrapper. ``scorer`` has no default here: each wrapper names the scorer its paper used."""

    scorer: str = Field(description="policy whose score() ranks entries (any registered policy)")
    scorer_options: dict[str, Any] = Field(default_factory=dict, description="options of the scorer")


class ScorerWrapper(Policy):
    """Base of policies that reshape the budget and delegate scoring to ``config.scorer``."""

    Config = WrapperConfig

    def __init__(self, config: PolicyConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        from kvpolicies.registry import get_policy

        self.scorer = get_policy(self.config.scorer, **self.config.scorer_options)
        if not self.scorer.compresses:
            raise PolicyConfigError(f"policy {self.name!r} cannot use {self.config.scorer!r} as its scorer: it keeps everything")
        self.needs = self.scorer.needs
        self.tracks = self.scorer.tracks

    @property
    def query_window(self) -> int | None:
        return self.scorer.query_window

    @property
    def protected(self) -> tuple[int, int]:
        own, inner = super().protected, self.scorer.protected
        return max(own[0], inner[0]), max(own[1], inner[1])

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return self.scorer.score(inputs)

    def calibrate(self, calibration: Calibration) -> Any:
        return self.scorer.calibrate(calibration)

    @property
    def calibrates(self) -> bool:
        return self.scorer.calibrates

    @property
    def calibrated(self) -> Any:
        return self.scorer.calibrated

    @calibrated.setter
    def calibrated(self, value: Any) -> None:  # the scorer's score() reads it
        self.scorer.calibrated = value
