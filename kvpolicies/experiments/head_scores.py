"""Head importance for HeadKV-style static budgets: a retrieval probe on passkey prompts, saved as JSON.

A head *retrieves* when, as the model copies a token of the passkey into its answer, the head's strongest attention
lands on that very token inside the needle (the retrieval-head score of Wu et al. 2024, which HeadKV builds on).
The score of a KV head is the hit rate of its query heads, averaged; a small constant keeps every head above zero.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from kvpolicies.errors import PolicyConfigError
from kvpolicies.experiments.probe import queries_and_keys


@torch.no_grad()
def retrieval_scores(model, tokenizer, samples: int = 8, context_tokens: int = 1000, seed: int = 0) -> torch.Tensor:
    """``[layers, kv_heads]`` retrieval hit rates measured on ``samples`` teacher-forced passkey prompts."""
    from kvpolicies_evals.data import passkey_prompt

    rng = random.Random(seed)
    config = model.config.get_text_config(decoder=True)
    kv_heads = config.num_key_value_heads
    groups = config.num_attention_heads // kv_heads
    hits = torch.zeros(config.num_hidden_layers, config.num_attention_heads)
    copies = 0
    for _ in range(samples):
        context, needle, passkey = passkey_prompt(rng, context_tokens)
        prompt_ids = tokenizer(context, return_tensors="pt")["input_ids"]
        # The answer as it appears in the needle (after a space), so the copied tokens match the needle's.
        answer_ids = tokenizer(" " + passkey, add_special_tokens=False, return_tensors="pt")["input_ids"]
        prompt_len, answer_len = prompt_ids.shape[1], answer_ids.shape[1]
        # Query at position t predicts token t + 1: the last answer_len + 1 rows emit the answer tokens.
        queries, cache = queries_and_keys(model, torch.cat([prompt_ids, answer_ids], dim=1), rows=answer_len + 1)
        targets = answer_ids[0].tolist()
        context_ids = prompt_ids[0].tolist()
        for layer_idx, query in queries.items():
            keys = cache.layers[layer_idx].keys[0, :, :prompt_len]  # [kv_heads, prompt_len, head_dim]
            for step, token in enumerate(targets):
                sources = {p for p, t in enumerate(context_ids) if t == token}
                q = query[0, :, step]  # [heads, head_dim], the query that emits `token`
                logits = torch.einsum("hd,hsd->hs", q.float(), keys.repeat_interleave(groups, 0).float())
                top = logits.argmax(-1).tolist()
                hits[layer_idx] += torch.tensor([float(p in sources) for p in top])
        copies += len(targets)
    per_query_head = hits / max(copies, 1)
    return per_query_head.view(config.num_hidden_layers, kv_heads, groups).mean(-1)


def save_head_scores(path: Path, scores: torch.Tensor, **metadata) -> None:
    payload = {"scores": scores.tolist(), "layers": scores.shape[0], "kv_heads": scores.shape[1], **metadata}
    path.write_text(json.dumps(payload, indent=1))


def load_head_scores(path: Path | str, smoothing: float = 0.01) -> torch.Tensor:
    """``[layers, kv_heads]`` weights from a ``kvpolicies head-scores`` file, each at least ``smoothing``."""
    try:
        payload = json.loads(Path(path).read_text())
        scores = torch.tensor(payload["scores"], dtype=torch.float64)
    except FileNotFoundError:
        raise PolicyConfigError(f"head scores file {path} does not exist; create it with `kvpolicies head-scores`") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PolicyConfigError(f"{path} is not a `kvpolicies head-scores` file: {error}") from None
    if scores.ndim != 2:
        raise PolicyConfigError(f"{path}: scores must be a [layers][kv_heads] table")
    return scores.clamp(min=0) + smoothing
