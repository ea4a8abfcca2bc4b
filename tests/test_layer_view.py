"""The one place that reads model internals for policies: RoPE and the output projection, per architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import CohereConfig, Gemma3TextConfig, LlamaConfig, Phi3Config
from transformers.models.cohere.modeling_cohere import CohereAttention
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention, Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3RotaryEmbedding

from kvpolicies import LayerView, ModelLoadError

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 100.0}, LLAMA3_ROPE])
def test_rotary_frequencies_equal_the_models_own_for_default_and_scaled_rope(rope):
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_parameters=rope)
    rotary = LayerView(LlamaAttention(config, layer_idx=0)).rotary
    assert rotary.dim == 8
    torch.testing.assert_close(rotary.inv_freq, LlamaRotaryEmbedding(config).inv_freq.float())


def test_partial_rotary_covers_only_the_rotated_dimensions():
    config = Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
                        pad_token_id=0)
    rotary = LayerView(Phi3Attention(config, layer_idx=0)).rotary
    assert rotary.dim == 8 and rotary.inv_freq.shape == (4,)
    torch.testing.assert_close(rotary.inv_freq, Phi3RotaryEmbedding(config).inv_freq.float())


def test_each_layer_type_gets_its_own_rope():
    """Gemma 3: local (sliding) layers use theta 1e4, global ones 1e6; each layer reads its own."""
    config = Gemma3TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                              pad_token_id=0)
    model_rope = Gemma3RotaryEmbedding(config)
    for layer, kind in enumerate(config.layer_types):
        rotary = LayerView(Gemma3Attention(config, layer_idx=layer)).rotary
        torch.testing.assert_close(rotary.inv_freq, getattr(model_rope, f"{kind}_inv_freq").float())
    local, global_ = (LayerView(Gemma3Attention(config, layer_idx=i)).rotary.inv_freq for i in (0, 1))
    assert not torch.allclose(local, global_)


def test_interleaved_rope_is_refused_naming_the_model():
    config = CohereConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    with pytest.raises(ModelLoadError, match="CohereAttention rotates interleaved dimension pairs"):
        LayerView(CohereAttention(config, layer_idx=0)).rotary


def test_output_projection_is_found_under_each_familys_name_or_refused_with_the_model_named():
    for name in ("o_proj", "out_proj", "dense"):
        module = torch.nn.Module()
        setattr(module, name, torch.nn.Linear(8, 6, bias=False))
        assert LayerView(module).output_projection is getattr(module, name).weight

    class FusedAttention(torch.nn.Module):
        pass

    with pytest.raises(ModelLoadError, match="FusedAttention has no output projection"):
        LayerView(FusedAttention()).output_projection
