"""Builders shared by several test modules. Test modules import from here (or use conftest fixtures), never from
each other; nothing here runs at import time beyond definitions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvpolicies import ScoreInputs
from kvpolicies.engine.selection import age_order

TASKS = str(Path(__file__).parents[1] / "evals" / "tasks")
"""The project's lm-eval task folder (``--include_path``)."""

NOW = "2026-11-24T12:00:00+00:00"


# -- models ------------------------------------------------------------------------------------------------------


def tiny_llama(num_layers: int = 8, attn_implementation: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    """A random Llama with GQA (6 query heads of 16 dimensions over 2 KV heads), small enough to run everywhere in
    milliseconds. Build it inside a test or a fixture (``tiny_model`` in conftest), never at import time."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=num_layers,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).eval()


def captured_query(model, cache, q_proj_out, position: int, layer_idx: int) -> torch.Tensor:
    """RoPE applied to a ``q_proj`` output captured from a :func:`tiny_llama` at ``position``.

    Returns ``[heads, 1, head_dim]``.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q = q_proj_out.view(1, 1, 6, 16).transpose(1, 2)
    cos, sin = model.model.rotary_emb(q, torch.tensor([[position]]))
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    return q[0]


def queries_and_keys_since_prefill(model, cache, ids: torch.Tensor, steps: list[torch.Tensor], layer_idx: int = 1
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``ids`` and decode ``steps`` on ``cache`` (one sequence of a :func:`tiny_llama`), and return every query
    of layer ``layer_idx`` since the prefill, RoPE applied (``[heads, positions, head_dim]``), with the keys of the
    whole sequence from transformers' own cache (``[kv_heads, positions, head_dim]``): what a track that follows
    every query since each entry arrived is checked against."""
    from transformers import DynamicCache

    plain = DynamicCache(config=model.config)
    queries = []
    handle = model.model.layers[layer_idx].self_attn.q_proj.register_forward_hook(lambda m, a, o: queries.append(o))
    with torch.no_grad():
        try:
            model(ids, cache=cache)
            for token in steps:
                model(token, cache=cache)
        finally:
            handle.remove()
        model(torch.cat([ids, *steps], 1), cache=plain)
    prompt = ids.shape[1]
    every = torch.cat([captured_query(model, cache, queries[0][:, p : p + 1], p, layer_idx) for p in range(prompt)]
                      + [captured_query(model, cache, q, prompt + i, layer_idx) for i, q in enumerate(queries[1:])],
                      dim=1)
    return every, plain.layers[layer_idx].keys[0]


# -- what a policy sees ------------------------------------------------------------------------------------------


def score_inputs(keys: torch.Tensor, values: torch.Tensor | None = None, *, valid: torch.Tensor | None = None,
                 keep: torch.Tensor | None = None, layer_idx: int = 0, **signals: Any) -> ScoreInputs:
    """``ScoreInputs`` for hand-made ``[batch, kv_heads, seq, head_dim]`` keys, as the cache would build them.

    ``valid`` defaults to every entry real; ``keep`` to every valid entry; ``signals`` are further fields
    (``queries``, ``attention``, ``cumulative_attention``, ``scaling``, ``layer``).
    """
    batch = keys.shape[0]
    valid = torch.ones(keys.shape[:3], dtype=torch.bool) if valid is None else valid
    return ScoreInputs(
        layer_idx=layer_idx,
        valid=valid,
        order=age_order(valid),
        seen_tokens=[int(valid[b, 0].sum()) for b in range(batch)],
        keep=valid.sum(-1) if keep is None else keep,
        keys=keys,
        values=values,
        **signals,
    )


def attention_received_by_loops(queries: torch.Tensor, keys: torch.Tensor, scaling: float,
                                valid: torch.Tensor | None = None, reduce: str = "sum") -> torch.Tensor:
    """Attention each key receives from the queries, summed (or their maximum, ``reduce="max"``), written as explicit
    loops in float64.

    ``queries``: ``[batch, heads, q_len, dim]``, the newest ``q_len`` real positions; ``keys``: ``[batch, kv_heads,
    seq, dim]``. Query ``j`` of a head sees the valid entries whose age rank is ``<= count - q_len + j`` (causal).
    Returns ``[batch, kv_heads, seq]``.
    """
    batch, kv_heads, seq, _ = keys.shape
    heads, q_len = queries.shape[1], queries.shape[2]
    groups = heads // kv_heads
    valid = torch.ones(batch, kv_heads, seq, dtype=torch.bool) if valid is None else valid
    out = torch.zeros(batch, kv_heads, seq, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kv = h // groups
            positions = [s for s in range(seq) if valid[b, kv, s]]
            for j in range(q_len):
                visible = positions[: len(positions) - q_len + j + 1]
                if not visible:
                    continue
                logits = torch.stack([(queries[b, h, j].double() @ keys[b, kv, s].double()) * scaling for s in visible])
                weights = torch.softmax(logits, dim=0)
                for s, w in zip(visible, weights):
                    out[b, kv, s] = max(out[b, kv, s], w) if reduce == "max" else out[b, kv, s] + w
    return out.float()


# -- result records ----------------------------------------------------------------------------------------------


def make_record(task: str, policy: str, budget, score: float, *, label: str | None = None, model: str | None = None,
                higher: bool = True, status: str = "ok", key: str | None = None, protocol: str = "query_aware",
                **fields):
    """A ``ResultRecord`` built through the record model, as every test's fake records are; ``policy == "full"`` is
    the reference. ``fields`` override any record field (``kv_memory=...``)."""
    from kvpolicies.experiments.grid import Cell, PolicySpec, TaskSpec
    from kvpolicies.experiments.results import ResultRecord

    cell = Cell(model=model, task=TaskSpec(name=task), policy=PolicySpec(name=policy, label=label), budget=budget,
                seed=0, protocol=protocol)
    metric = "exact_match,first_key" if higher else "word_perplexity,none"
    outcome = {"error": "RuntimeError: boom"} if status != "ok" else {
        "metrics": {metric: score}, "primary_metric": metric, "score": score, "higher_is_better": higher,
        "samples": 10, "kv_memory": {"resident_bytes_mean": 100.0, "full_bytes_mean": 200.0},
        "speed": {"prefill_tokens_per_s": 1000.0, "decode_tokens_per_s": 20.0}, "peak_memory_bytes": 2**30,
        "device": "cpu",
    }
    identity = {"model": model or "smollm2-135m-instruct", "policy": {"policy": policy, "config": {}},
                "budget": None if policy == "full" else cell.budget, "code_version": "0.1.0+abc/def"}
    return ResultRecord(key=key or f"{task}-{policy}-{label}-{budget}-{model}-{protocol}", cell=cell, identity=identity,
                        versions={"kvpolicies": "0.1.0", "torch": "2.13.0"}, started_at=NOW, finished_at=NOW,
                        status=status, **outcome | fields)


def write_records(results: Path, records: list) -> Path:
    """Save ``records`` as result files in ``results`` (created if needed); returns the folder."""
    from kvpolicies.experiments.results import write_record

    results.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(records):
        write_record(results / f"{i:04d}.json", item)
    return results


# -- lm-eval -----------------------------------------------------------------------------------------------------


def evaluate(model, tasks: list[str], metadata: dict, **kwargs):
    """lm-eval's ``simple_evaluate`` on the project's tasks with ``metadata`` (lengths, depths, ...)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=model, tasks=tasks, task_manager=TaskManager(include_path=TASKS, metadata=metadata),
        bootstrap_iters=0, **kwargs,
    )
