"""Shared fixtures: a tiny random-weight Llama for most tests, the real embedded model once per session."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import kvpolicies
from kvpolicies.integrations.models import converted_gguf, embedded_gguf
from tests.helpers import tiny_llama

pytest_plugins = ["tests.models_table"]  # --models-table: docs/models.md from the architecture matrix

# Property tests explore the same examples on every run: a CI failure is always reproducible locally.
settings.register_profile("kvpolicies", derandomize=True, deadline=None)
settings.load_profile("kvpolicies")


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    """A fresh :func:`tests.helpers.tiny_llama` (8 layers, sdpa) per test: tests may change its settings."""
    return tiny_llama()


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M-Instruct (fp32, CPU unless CUDA is present), loaded once."""
    return kvpolicies.load_model()


@pytest.fixture
def fresh_registry(monkeypatch):
    """A registry that re-reads the entry points, restored afterwards."""
    kvpolicies.reset_registry()
    yield
    monkeypatch.undo()
    kvpolicies.reset_registry()


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory) -> str:
    """A random-weight Llama with the embedded model's tokenizer, saved as a normal model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(str(converted_gguf(embedded_gguf())), local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
