"""Calibration: what a policy learns from the model itself, once per model, before it compresses anything.

Why a step apart: some methods are fitted to a model, not to a prompt. Q-Filters ranks keys by their projection on
one direction per head, the main direction of that head's queries over ordinary text; its published filters are
downloads for a few models, neither made for ours nor to be had offline, so they are computed here, from the
model's own queries. ``score()`` runs inside a forward pass and cannot run the model, so a policy that implements
``calibrate(calibration)`` is handed a :class:`Calibration` when its first cache on a model is built, and what it
returns is set as ``policy.calibrated`` for ``score()`` to read.

Cost: a calibration runs once per model and policy config in a process (the first cell pays it; another cell of the
same sweep finds it done), before any prompt, and its time is recorded next to every result (``calibration_s``),
since that is what a user pays once per model.

The text: the last third of the Python documentation that ships with CPython (:mod:`kvpolicies.corpus`), which no
task's haystack reaches: the filters are never fitted on a prompt they are scored on.
"""

from __future__ import annotations

import copy
import json
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvpolicies.corpus import calibration_text
from kvpolicies.engine.attention import recording_queries
from kvpolicies.engine.clock import clock
from kvpolicies.errors import ModelLoadError, UsageError, out_of_memory

if TYPE_CHECKING:
    from kvpolicies.engine.policy import Policy


class CalibratedWithoutText(UserWarning):
    """A calibration ran without the model's tokenizer, on random token ids instead of text."""


@dataclass
class Calibration:
    """What a policy's ``calibrate()`` may ask of the model."""

    model: object = field(repr=False)
    tokenizer: object | None = field(repr=False, default=None)

    def queries(self, sequences: int, tokens: int, samples: int, seed: int = 0) -> list[torch.Tensor | None]:
        """Per layer, ``[heads, samples, head_dim]`` in the model's dtype: post-RoPE queries of the model's own
        forward over ``sequences`` consecutive pieces of the calibration text, ``tokens`` tokens each (the model's
        context if shorter, and its tokenizer's BOS first where it has one), at ``samples`` places drawn at random
        (``seed``) among all the pieces' tokens, the same places in every layer. None for a layer whose attention
        did not run through the model's attention interface. The queries are held until returned: ``samples`` ×
        heads × head_dim per layer.

        Without a tokenizer (a cache built without one) the pieces are random token ids, with a warning: the
        policy then runs, but not as published."""
        return _queries(self.model, self.tokenizer, sequences, tokens, samples, seed)


_FITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per model, what each policy config's calibration returned in this process, and its seconds, or the error it
raised: one calibration per model and config, whatever the number of cells that use it."""


def calibrate(policy: Policy, model, tokenizer=None) -> float:
    """Set ``policy.calibrated`` to what its ``calibrate()`` returns on ``model``, calibrating once per model and
    policy config in this process (a no-op for a policy without ``calibrate``); return the calibration's seconds as
    it took when it ran (the forward passes it asked for and its own fitting), 0 for none. A failing ``calibrate``
    is a PluginError naming the plugin, and is remembered like a result: every later cache of that model and config
    raises it again at once (a sweep's next cells of a model that cannot calibrate fail without rerunning it), unless
    it ran out of memory, which a later try with more memory free may not."""
    if not policy.calibrates:
        return 0.0
    key = (json.dumps(policy.identity(), sort_keys=True), tokenizer is not None)
    fitted = _FITTED.setdefault(model, {})
    if key not in fitted:
        device = next(model.parameters()).device
        started = clock(device)
        try:
            value = policy.calibrate(Calibration(model, tokenizer))
        except Exception as error:  # a bug in the plugin is named, as for every hook; our own errors pass as they are
            from kvpolicies.registry import plugin_error  # the registry imports the plugins, which import the engine

            failure = plugin_error(type(policy), "calibrate", error)
            if not out_of_memory(failure):  # the machine's failure may pass with more memory free: tried again
                # A copy, without the traceback whose frames hold the model (the memo's weak key).
                fitted[key] = copy.copy(failure)
            raise failure
        fitted[key] = (value, clock(device) - started)
    if isinstance(fitted[key], Exception):  # the same calibration would fail the same way: said again, not rerun
        raise copy.copy(fitted[key])
    policy.calibrated, seconds = fitted[key]
    return seconds


@torch.no_grad()
def _queries(model, tokenizer, sequences: int, tokens: int, samples: int, seed: int) -> list[torch.Tensor | None]:
    config = model.config.get_text_config(decoder=True)
    device = next(model.parameters()).device
    longest = getattr(config, "max_position_embeddings", None) or tokens
    tokens = min(tokens, longest)
    pieces = _pieces(tokenizer, config.vocab_size, sequences, tokens, seed)
    generator = torch.Generator().manual_seed(seed)
    total = sum(len(piece) for piece in pieces)
    chosen = torch.randperm(total, generator=generator)[:samples].sort().values
    gathered: dict[int, list[torch.Tensor]] = {}
    offset = 0
    for piece in pieces:
        places = chosen[(chosen >= offset) & (chosen < offset + len(piece))] - offset
        offset += len(piece)
        if not len(places):
            continue
        # CPU indices are valid on any device: a model split over several finds each layer's queries where they are
        with recording_queries(model, lambda query, index=places: query[0, :, index]) as queries:
            model(torch.tensor([piece], device=device), use_cache=False, logits_to_keep=1)
        for layer, found in queries.items():
            gathered.setdefault(layer, []).append(found)
    if not gathered:
        raise ModelLoadError(f"{type(model).__name__} does not run its attention through transformers' "
                             "AttentionInterface, so its queries cannot be read to calibrate a policy; kvpolicies "
                             "supports models written with it (Llama, Qwen2, Mistral, ...)")
    return [torch.cat(gathered[i], dim=1) if i in gathered else None for i in range(config.num_hidden_layers)]


def _pieces(tokenizer, vocab_size: int, sequences: int, tokens: int, seed: int) -> list[list[int]]:
    if tokenizer is None:
        warnings.warn("the cache has no tokenizer, so the policy calibrated on random token ids instead of text; "
                      "build it with CompressedCache(model, policy, budget, tokenizer=tokenizer) for the method as "
                      "published", CalibratedWithoutText, stacklevel=4)
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (sequences, tokens), generator=generator).tolist()
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    ids = tokenizer(calibration_text(), add_special_tokens=False)["input_ids"]
    size = tokens - len(bos)
    if len(ids) < sequences * size:
        raise UsageError(f"the calibration text holds {len(ids)} tokens of this model's tokenizer, fewer than "
                         f"{sequences} pieces of {tokens}; ask for at most {len(ids) // size} pieces of {tokens} "
                         "tokens, or shorter pieces")
    return [bos + ids[start * size:(start + 1) * size] for start in range(sequences)]
