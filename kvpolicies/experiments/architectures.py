"""The architecture matrix: a tiny random-weight model of each family kvpolicies supports, built from transformers'
own config classes (no download), and of the families it refuses.

Why in the package and not only in the tests: the test suite runs the matrix on the CPU in float32, and a GPU's
kernels and half precision are what it cannot show, so ``kvpolicies selfcheck --architectures`` runs the same
models on any device and dtype. Two layers and a 64-wide hidden state keep the whole matrix small enough for both.
"""

from __future__ import annotations

import torch
import transformers

COMMON = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
WINDOW = 8
"""Sliding window of the windowed configs: shorter than every prompt here, so windows really slide."""

ARCHITECTURES: dict[str, tuple[str, dict, str]] = {
    # name: (config class, options beyond COMMON, attention implementation)
    "llama-gqa": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 2}, "sdpa"),
    "llama-mha": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 4}, "sdpa"),
    "llama-mqa": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 1}, "sdpa"),
    "llama-head-dim-24": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24},
                          "sdpa"),
    "mistral": ("MistralConfig", {"num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": None},
                "sdpa"),
    "mistral-sliding-window": ("MistralConfig", {"num_attention_heads": 4, "num_key_value_heads": 2,
                                                 "sliding_window": WINDOW}, "sdpa"),
    "qwen2": ("Qwen2Config", {"num_attention_heads": 4, "num_key_value_heads": 2}, "sdpa"),
    "qwen3-qk-norm": ("Qwen3Config", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}, "sdpa"),
    "gemma2": ("Gemma2Config", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                "sliding_window": WINDOW, "attn_logit_softcapping": 1.0, "initializer_range": 0.2},
               "eager"),
    "gemma3": ("Gemma3TextConfig", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                    "sliding_window": WINDOW,
                                    "layer_types": ["sliding_attention", "full_attention"]}, "sdpa"),
    "olmo2": ("Olmo2Config", {"num_attention_heads": 4, "num_key_value_heads": 2}, "sdpa"),
    "phi3-partial-rotary": ("Phi3Config", {"num_attention_heads": 4, "num_key_value_heads": 2,
                                           "partial_rotary_factor": 0.5}, "sdpa"),
    "cohere-interleaved-rope": ("CohereConfig", {"num_attention_heads": 4, "num_key_value_heads": 2}, "sdpa"),
    "qwen3-moe": ("Qwen3MoeConfig", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                     "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
                  "sdpa"),
}
"""Gemma 2's weights are drawn larger and its soft-cap lowered to 1, so that attention logits (up to ~3) really are
capped: at the default scale (logits ~0.03) and cap (50) tanh would be the identity and a missing cap would pass."""

UNSUPPORTED: dict[str, tuple[str, dict, str]] = {
    # name: (config class, options, what the error names)
    "mamba (state space)": ("MambaConfig", {"vocab_size": 96, "hidden_size": 64, "state_size": 8,
                                            "num_hidden_layers": 2, "pad_token_id": 0, "bos_token_id": 1,
                                            "eos_token_id": 2, "expand": 2, "conv_kernel": 4}, "no attention heads"),
    "jamba (attention + mamba)": ("JambaConfig", COMMON | {
        "num_attention_heads": 4, "num_key_value_heads": 2, "attn_layer_period": 2, "attn_layer_offset": 1,
        "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 2, "num_experts_per_tok": 1,
        "use_mamba_kernels": False, "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_expand": 2}, "linear_attention"),
    "qwen3-next (linear attention)": ("Qwen3NextConfig", COMMON | {
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
        "num_experts_per_tok": 2, "num_experts": 4, "layer_types": ["linear_attention", "full_attention"]},
        "linear_attention"),
    "lfm2 (convolution)": ("Lfm2Config", COMMON | {"num_attention_heads": 4, "num_key_value_heads": 2,
                                                   "layer_types": ["conv", "full_attention"],
                                                   "block_multiple_of": 16}, "conv"),
    "falcon-h1 (hybrid layers)": ("FalconH1Config", COMMON | {
        "num_attention_heads": 4, "num_key_value_heads": 2, "mamba_d_ssm": 64, "mamba_n_heads": 4,
        "mamba_d_head": "auto", "mamba_n_groups": 1, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2,
        "mamba_chunk_size": 8}, "hybrid"),
    "llama4 (chunked attention)": ("Llama4TextConfig", COMMON | {
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64, "intermediate_size_mlp": 128,
        "head_dim": 16, "num_local_experts": 2, "num_experts_per_tok": 1, "no_rope_layer_interval": 2,
        "attention_chunk_size": 4}, "chunked_attention"),
    "deepseek-v3 (latent attention)": ("DeepseekV3Config", COMMON | {
        "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": None,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "moe_intermediate_size": 32,
        "n_routed_experts": 2, "num_experts_per_tok": 1, "first_k_dense_replace": 2, "n_group": 1, "topk_group": 1},
        "multi-head latent attention"),
}


def build(spec: tuple[str, dict, str], dtype: torch.dtype = torch.float32, attn: str | None = None,
          device: torch.device | str = "cpu"):
    """The model of one matrix entry, with seeded random weights, in ``dtype`` on ``device``."""
    config_name, options, implementation = spec
    config = getattr(transformers, config_name)(**(COMMON | options))
    config._attn_implementation = attn or implementation
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()


def prompt(length: int = 40, seed: int = 1) -> torch.Tensor:
    """``[1, length]`` seeded random ids, none of them the configs' pad, BOS or EOS."""
    return torch.randint(3, COMMON["vocab_size"], (1, length), generator=torch.Generator().manual_seed(seed))
