"""The one place that reads model internals for policies: RoPE and the output projection, per architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import CohereConfig, Gemma3TextConfig, LlamaConfig, Phi3Config
from transformers.models.cohere.modeling_cohere import CohereAttention
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention, Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaModel, LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3Model, Phi3RotaryEmbedding

from kvpolicies import LayerView, ModelLoadError
from kvpolicies.engine.layer_view import Rotary

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 100.0}, LLAMA3_ROPE])
def test_rotary_frequencies_equal_the_models_own_for_default_and_scaled_rope(rope):
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_parameters=rope)
    rotary = LayerView(LlamaAttention(config, layer_idx=0)).rotary
    assert rotary.dim == 8
    torch.testing.assert_close(rotary.inv_freq, LlamaRotaryEmbedding(config).inv_freq.float())
    assert LayerView(LlamaAttention(config, layer_idx=0)).rotary_at(100_000).inv_freq.equal(rotary.inv_freq)


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


TINY = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
        "intermediate_size": 32, "vocab_size": 16, "pad_token_id": 0}


def assert_rotation_is_the_models(view: LayerView, model: torch.nn.Module, seq_len: int) -> Rotary:
    """The view's RoPE for a forward over positions ``0 .. seq_len - 1`` rotates as the model's own ``rotary_emb``
    called with those positions. The model's cos/sin also carry its attention scaling (longrope's ``attention_factor``),
    which multiplies queries and keys alike and is already inside cached post-RoPE queries, so it is divided out."""
    positions = torch.arange(seq_len)[None]
    cos, sin = model.rotary_emb(torch.zeros(1), positions)
    rotary = view.rotary_at(seq_len)
    angles = positions[..., None].float() * rotary.inv_freq
    angles = torch.cat([angles, angles], dim=-1)  # rotate_half: pair (k, k + dim/2) turns by the same angle
    scaling = model.rotary_emb.attention_scaling
    torch.testing.assert_close(angles.cos(), cos[..., : rotary.dim] / scaling)
    torch.testing.assert_close(angles.sin(), sin[..., : rotary.dim] / scaling)
    return rotary


def test_longrope_switches_to_the_long_factors_past_the_original_length_as_the_model_does():
    """Phi-3.5: short factors up to ``original_max_position_embeddings``, long factors for the whole forward past it."""
    rope = {"type": "longrope", "factor": 4.0, "short_factor": [1.0, 1.5, 2.0, 3.0],
            "long_factor": [4.0, 8.0, 16.0, 32.0]}
    config = Phi3Config(**TINY, max_position_embeddings=256, original_max_position_embeddings=64, rope_scaling=rope)
    model = Phi3Model(config).eval()
    view = LayerView(model.layers[0].self_attn)
    short = [assert_rotation_is_the_models(view, model, n).inv_freq for n in (10, 64)]
    long = [assert_rotation_is_the_models(view, model, n).inv_freq for n in (65, 200)]
    assert short[0].equal(short[1]) and long[0].equal(long[1])
    assert not torch.allclose(short[0], long[0])  # the two regimes really differ
    torch.testing.assert_close(view.rotary.inv_freq, short[0])  # what the model builds at load time
    assert_rotation_is_the_models(view, model, 30)  # back below the original length: short again


def test_dynamic_ntk_frequencies_follow_the_sequence_length_as_the_model_does():
    """Dynamic NTK raises the RoPE base with every token past ``max_position_embeddings`` and returns to the plain
    frequencies below it; lengths grow as in generation, which is when the model's frequencies are a function of the
    current length alone."""
    config = LlamaConfig(**TINY, head_dim=8, max_position_embeddings=64,
                         rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0})
    model = LlamaModel(config).eval()
    view = LayerView(model.layers[0].self_attn)
    frequencies = [assert_rotation_is_the_models(view, model, n).inv_freq for n in (16, 64, 65, 100, 101, 300)]
    assert frequencies[0].equal(frequencies[1])
    assert len({tuple(f.tolist()) for f in frequencies[1:]}) == 5  # a new base for every length past 64
    assert_rotation_is_the_models(view, model, 20)  # a new, short prompt: the plain frequencies again


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
