"""What a policy may know about the attention layer it scores, read from the model in one place.

Model families name and shape their parts differently (``o_proj`` or ``out_proj``, RoPE over the whole head or part
of it, one RoPE for every layer or one per layer type). A policy that reached into the module itself would be
right on Llama and silently wrong elsewhere, so each fact has one reader here, and a model this reader does not
understand is an error that names the model, never a guess.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property

import torch

from kvpolicies.errors import ModelLoadError

OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj")
"""Attribute names of the attention output projection across transformers' model families."""


@dataclass(frozen=True)
class Rotary:
    """The rotary position embedding of a layer: ``inv_freq[k]`` rotates dimension pairs ``(k, k + dim/2)`` of the
    first ``dim`` dimensions of each head (the ``rotate_half`` convention of the Llama family; a model that rotates
    interleaved pairs ``(2k, 2k + 1)``, like Cohere or GLM, is refused by :attr:`LayerView.rotary`); the rest of the
    head is not rotated."""

    inv_freq: torch.Tensor
    """``[dim / 2]`` float32 angular frequencies, scaling (llama3, yarn, ...) included."""
    dim: int


class LayerView:
    """Facts about one attention layer: its output projection and its RoPE (read once, on first use)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    @property
    def name(self) -> str:
        return type(self.module).__name__

    @cached_property
    def output_projection(self) -> torch.Tensor:
        """The output matrix ``W_o``, ``[hidden, heads × head_dim]``: head ``j`` writes ``W_o[:, j·d:(j+1)·d] v``."""
        for attribute in OUTPUT_PROJECTIONS:
            layer = getattr(self.module, attribute, None)
            if isinstance(layer, torch.nn.Linear):
                return layer.weight
        raise ModelLoadError(
            f"{self.name} has no output projection under any of {', '.join(OUTPUT_PROJECTIONS)}; a policy that "
            "reads it (criticalkv) cannot run on this model"
        )

    @cached_property
    def rotary(self) -> Rotary:
        """This layer's RoPE, from the model config: default or scaled rope types, partial rotary, and per-layer-type
        parameters (local and global layers with different RoPE)."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        self._check_rotate_half()
        config = getattr(self.module, "config", None)
        if config is None:
            raise ModelLoadError(f"{self.name} carries no config, so its RoPE cannot be read")
        head_dim = getattr(self.module, "head_dim", None) or getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads)
        parameters = dict(getattr(config, "rope_parameters", None) or {})
        layer_types = getattr(config, "layer_types", None)
        layer_idx = getattr(self.module, "layer_idx", None)
        layer_type = layer_types[layer_idx] if layer_types and layer_idx is not None else None
        if layer_type in parameters:
            parameters = dict(parameters[layer_type])  # RoPE per layer type (Gemma 3)
        else:
            layer_type = None
        if any(isinstance(value, dict) for value in parameters.values()):
            raise ModelLoadError(f"{self.name}: rope parameters nested under {sorted(parameters)}, which are not this "
                                 "model's layer types; kvpolicies cannot tell which RoPE this layer uses")
        factor = parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        dim = int(head_dim * factor)
        rope_type = parameters.get("rope_type", "default")
        if rope_type == "default":
            theta = parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        elif rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None, layer_type=layer_type)
        else:
            raise ModelLoadError(f"{self.name}: unknown rope type {rope_type!r}")
        return Rotary(inv_freq=inv_freq.float(), dim=2 * inv_freq.numel())  # what the frequencies rotate

    def _check_rotate_half(self) -> None:
        """Refuse a model whose RoPE pairs dimensions differently from ``rotate_half``: read from the ``rotate_half``
        its own modeling code applies, tried on a probe vector (names alone do not tell: Cohere's ``rotate_half``
        rotates interleaved pairs)."""
        code = sys.modules.get(type(self.module).__module__)
        rotate_half = getattr(code, "rotate_half", None)
        if rotate_half is None or hasattr(code, "apply_rotary_pos_emb_interleave"):
            raise ModelLoadError(f"{self.name}: cannot tell how this model applies RoPE (its modeling code has no "
                                 "rotate_half, or de-interleaves first); a policy that reads RoPE cannot run on it")
        if not torch.equal(rotate_half(torch.arange(4.0)), torch.tensor([-2.0, -3.0, 0.0, 1.0])):
            raise ModelLoadError(f"{self.name} rotates interleaved dimension pairs (0, 1), (2, 3), ...; kvpolicies "
                                 "reads RoPE in the rotate-half convention of the Llama family, so a policy that "
                                 "reads RoPE (expected_attention) cannot run on this model")
