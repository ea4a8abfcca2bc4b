"""The one place that reads model internals for policies: RoPE and the output projection, per architecture."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from kvpolicies import LayerView, ModelLoadError

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 100.0}, LLAMA3_ROPE])
def test_rotary_frequencies_equal_the_models_own_for_default_and_scaled_rope(rope):
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_parameters=rope)
    rotary = LayerView(SimpleNamespace(config=config, head_dim=8)).rotary
    assert rotary.dim == 8
    torch.testing.assert_close(rotary.inv_freq, LlamaRotaryEmbedding(config).inv_freq.float())


def test_partial_rotary_covers_only_the_rotated_dimensions():
    config = Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
                        pad_token_id=0)
    rotary = LayerView(SimpleNamespace(config=config, head_dim=16)).rotary
    assert rotary.dim == 8 and rotary.inv_freq.shape == (4,)
    torch.testing.assert_close(rotary.inv_freq, Phi3RotaryEmbedding(config).inv_freq.float())


def test_output_projection_is_found_under_each_familys_name_or_refused_with_the_model_named():
    for name in ("o_proj", "out_proj", "dense"):
        module = torch.nn.Module()
        setattr(module, name, torch.nn.Linear(8, 6, bias=False))
        assert LayerView(module).output_projection is getattr(module, name).weight

    class FusedAttention(torch.nn.Module):
        pass

    with pytest.raises(ModelLoadError, match="FusedAttention has no output projection"):
        LayerView(FusedAttention()).output_projection
