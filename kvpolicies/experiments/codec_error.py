"""How far each storage codec's keys and values are from what the model computed: ``kvpolicies bench --codec-error``.

Why: a codec's bytes are counted exactly, but a saving says nothing until what comes back is known, and known next
to an implementation users already trust. So each codec stores one prompt's keys and values through a compressed
cache that keeps every entry, exactly as a cell would, and its decoded tensors are compared with what transformers'
plain cache holds after the same forward. The reference rows are transformers' own ``QuantizedCache`` with its
optimum-quanto backend at 4 and 2 bits and its other defaults (a scale and a shift per 64 consecutive numbers of a
layer's keys or values, which at 64 or 128 channels a head are groups of channels within one entry), fed the same
tensors through its public ``update`` as its prefill would be. They appear where optimum-quanto is installed
(``pip install 'kvpolicies[quanto]'``) and a head's channels are a multiple of 64 (otherwise its groups would span
entries, which is not the comparison). quanto runs on CPU copies: on CUDA its first call compiles its kernels.

Three errors, each relative (``‖decoded − computed‖ / ‖computed‖`` over a layer), as the mean over layers and the
worst layer: keys; values; and the attention output of the prompt's last query over the decoded cache, at the
layer's own logit scaling and soft-capping: the view the first decoding step has, and the error that reaches the
rest of the model. A sliding-window layer is compared over the newest entries both hold (its window), with no
window mask (the window is what it holds). Bytes are what the codec stores for the prompt, as a share of the
full-precision cache: the bytes of the tensors each holds (ours: scales and KIVI's full-precision residual included;
quanto's: every inner tensor of its quantized tensors).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from kvpolicies.engine.attention import recording_queries
from kvpolicies.engine.cache import CompressedCache
from kvpolicies.engine.signals import LogitScale

QUANTO_BITS = (4, 2)
"""The widths transformers' quanto backend offers."""
QUANTO_GROUP = 64
"""transformers' default ``q_group_size`` for the quanto backend."""

Layers = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer, ``(keys, values)`` as ``[1, kv_heads, entries, head_dim]``."""
LastQueries = list[tuple[torch.Tensor | None, LogitScale | None]]
"""Per layer, the prompt's last query ``[1, heads, 1, head_dim]`` and the layer's logit scale (None where the
layer's attention did not run through the model's attention interface)."""


@dataclass(frozen=True)
class CodecError:
    """One codec's errors on one prompt."""

    codec: str
    context_tokens: int
    stored_share: float
    """Bytes stored for the prompt's keys and values over the full-precision cache's."""
    key_error: float
    key_error_worst: float
    value_error: float
    value_error_worst: float
    output_error: float
    output_error_worst: float

    def as_dict(self) -> dict[str, Any]:
        """The row for JSON: a NaN (no layer's query recorded) as None."""
        return {name: None if isinstance(value, float) and math.isnan(value) else value
                for name, value in asdict(self).items()}


def quanto_available() -> bool:
    """Whether transformers' quanto backend can run here (optimum-quanto installed)."""
    from transformers.utils import is_optimum_quanto_available

    return is_optimum_quanto_available()


def lossy_codecs() -> list[str]:
    """Every registered codec that does not store entries as computed."""
    from kvpolicies.registry import get_codec, list_codecs

    return [info.name for info in list_codecs() if not get_codec(info.name).lossless]


def reference_refused(model) -> str | None:
    """Why transformers' QuantizedCache is not compared on ``model``, or None when it is."""
    if not quanto_available():
        return "optimum-quanto is not installed (pip install 'kvpolicies[quanto]')"
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    if head_dim % QUANTO_GROUP:
        return (f"this model's heads have {head_dim} channels, and its groups of {QUANTO_GROUP} numbers would span "
                "entries")
    return None


@torch.no_grad()
def codec_errors(model, ids: torch.Tensor, codecs: Sequence[str], reference: bool = True) -> list[CodecError]:
    """Rows for every codec in ``codecs``, then transformers' QuantizedCache at 4 and 2 bits when ``reference``
    and :func:`reference_refused` says nothing, on the ``[1, tokens]`` prompt ``ids``."""
    from transformers import DynamicCache

    caches = {name: CompressedCache(model, "full", 1.0, codec=name) for name in codecs}  # refusals before any run
    plain = DynamicCache(config=model.config)  # sliding-window layers hold their window, as ours do
    scales: dict[int, LogitScale] = {}
    with recording_queries(model, lambda query: query[:, :, -1:].clone(), scales) as queries:
        model(ids, cache=plain, logits_to_keep=1)
    computed = [(layer.keys, layer.values) for layer in plain.layers]
    last = [(queries.get(index), scales.get(index)) for index in range(len(computed))]
    tokens = ids.shape[1]
    rows = []
    for name, cache in caches.items():
        model(ids, cache=cache, logits_to_keep=1)
        decoded = [layer.dense_view(tracks=False)[:2] for layer in cache.layers]
        stats = cache.stats()
        rows.append(_row(name, tokens, stats.resident_bytes / stats.full_bytes, computed, decoded, last))
    if reference and reference_refused(model) is None:
        full = sum(_tensor_bytes(keys) + _tensor_bytes(values) for keys, values in computed)
        for bits in QUANTO_BITS:
            decoded, stored = _quanto(computed, bits)
            rows.append(_row(f"QuantizedCache quanto int{bits}", tokens, stored / full, computed, decoded, last))
    return rows


def _quanto(computed: Layers, bits: int) -> tuple[Layers, int]:
    """What transformers' QuantizedCache (quanto backend, ``bits`` bits, its other defaults) returns for each
    layer's prompt once it holds it, and the bytes of the quantized tensors it keeps for them."""
    from transformers.cache_utils import QuantoQuantizedLayer

    decoded, stored = [], 0
    for keys, values in computed:
        keys, values = keys.cpu(), values.cpu()
        layer = QuantoQuantizedLayer(nbits=bits, q_group_size=QUANTO_GROUP)
        layer.update(keys, values)  # the prefill: quantized and kept, the computed tensors returned
        decoded.append(layer.update(keys[:, :, :0], values[:, :, :0]))  # no new token: what it holds, decoded
        stored += sum(_tensor_bytes(held) for held in (layer._quantized_keys, layer._quantized_values))
    return decoded, stored


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """The bytes a tensor holds, through every inner tensor of a tensor subclass (quanto's quantized tensors keep
    codes, scales and shifts as inner tensors)."""
    if type(tensor) is torch.Tensor or not hasattr(tensor, "__tensor_flatten__"):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(_tensor_bytes(getattr(tensor, name)) for name in names)


def _row(name: str, tokens: int, share: float, computed: Layers, decoded: Layers, last: LastQueries) -> CodecError:
    """The errors of ``decoded`` against ``computed``, layer by layer, reduced to means and worst layers."""
    keys, values, outputs = [], [], []
    for (ours_k, ours_v), (exact_k, exact_v), (query, scale) in zip(decoded, computed, last):
        both = min(ours_k.shape[2], exact_k.shape[2])  # a sliding-window layer: the newest entries both hold
        ours_k, ours_v, exact_k, exact_v = (t[:, :, -both:].to(exact_k.device)
                                            for t in (ours_k, ours_v, exact_k, exact_v))
        keys.append(_relative(ours_k, exact_k))
        values.append(_relative(ours_v, exact_v))
        if query is not None:
            outputs.append(_relative(attention(query, ours_k, ours_v, scale), attention(query, exact_k, exact_v, scale)))
    return CodecError(name, tokens, share, statistics.fmean(keys), max(keys), statistics.fmean(values), max(values),
                      statistics.fmean(outputs) if outputs else math.nan, max(outputs, default=math.nan))


def attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              scale: LogitScale | None = None) -> torch.Tensor:
    """Softmax attention of ``query`` ``[1, heads, q, d]`` over ``[1, kv_heads, n, d]`` keys and values (no mask),
    in float32, each KV head read by its group of query heads: ``[1, heads, q, d]``."""
    groups = query.shape[1] // keys.shape[1]
    keys, values = (t.float().repeat_interleave(groups, dim=1) for t in (keys, values))
    scale = scale or LogitScale(query.shape[-1] ** -0.5)
    logits = scale.apply_(query.float() @ keys.transpose(-1, -2))
    return torch.softmax(logits, dim=-1) @ values


def _relative(approximate: torch.Tensor, exact: torch.Tensor) -> float:
    """``‖approximate − exact‖ / ‖exact‖``, in float32."""
    exact = exact.float()
    error = torch.linalg.vector_norm(approximate.float() - exact)
    return float(error / torch.linalg.vector_norm(exact).clamp_min(1e-30))


def measure(model_name: str | None, contexts: Sequence[int], codecs: Sequence[str] | None = None,
            device: str | None = None, dtype: str | None = None, random_model: str | None = None,
            loading: dict | None = None, json_path: Path | None = None,
            progress: Callable[[str], None] | None = None) -> tuple[str, list[CodecError]]:
    """Load the model and measure ``codecs`` (default: every lossy one) on the benchmark's prompt at every context;
    a header says on what. With ``json_path``, also save ``{"header", "codec_errors"}`` there."""
    import json

    import transformers

    from kvpolicies.experiments.bench import _load, prompt_ids
    from kvpolicies.registry import get_codec

    codecs = list(codecs) if codecs else lossy_codecs()
    for name in codecs:
        get_codec(name)  # an unknown name fails before the model loads
    model, tokenizer = _load(model_name, device, dtype, random_model, loading)
    refused = reference_refused(model)
    if refused and progress:
        progress(f"transformers' QuantizedCache is not compared: {refused}")
    rows = []
    for tokens in contexts:
        if progress:
            progress(f"codec errors at {tokens} tokens")
        rows += codec_errors(model, prompt_ids(tokenizer, tokens, model.device, model.config.vocab_size), codecs)
    name = f"random-weight {random_model}" if random_model else model_name or "embedded SmolLM2-135M-Instruct"
    header = (f"model: {name}, device: {model.device}, dtype: {model.dtype}, torch {torch.__version__}, "
              f"transformers {transformers.__version__}"
              + ("" if refused else f", optimum-quanto {version('optimum-quanto')}"))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"header": header, "codec_errors": [row.as_dict() for row in rows]},
                                        indent=1) + "\n")
    return header, rows


def table(rows: Sequence[CodecError], tablefmt: str = "github") -> str:
    """One row per codec and context: the share of bytes and the three errors, mean and worst layer, in %."""
    from tabulate import tabulate

    def percent(x: float) -> str:
        return "-" if math.isnan(x) else f"{100 * x:.2f}"

    body = [[row.codec, row.context_tokens, f"{100 * row.stored_share:.1f}",
             percent(row.key_error), percent(row.key_error_worst), percent(row.value_error),
             percent(row.value_error_worst), percent(row.output_error), percent(row.output_error_worst)]
            for row in rows]
    headers = ["codec", "tokens", "bytes % of full", "keys err %", "keys, worst layer", "values err %",
               "values, worst layer", "last query's output err %", "output, worst layer"]
    return tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)

