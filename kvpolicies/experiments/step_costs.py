"""What one decoding step costs a GPU, counted on any device: kernel launches and host-device syncs per step.

``kvpolicies bench --step-costs`` prints it. Why a table of counts next to the timings: on a CPU a sync costs
nothing and a launch little, so the timings there cannot show the costs that dominate small-batch decoding on a GPU;
the counts can (see :mod:`kvpolicies.experiments.device_work` for what is counted and why it is exact enough). Each
policy decodes a left-padded batch (every row but the first padded by a different amount, so layers are ragged as
they are under lm-eval) twice: with the default slack, where most steps evict nothing, and with slack 0, where
steps evict; the table gives the mean per step, the plain model's own work (the full cache) first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvpolicies.engine.budget import Budget, BudgetError
from kvpolicies.engine.cache import CompressedCache
from kvpolicies.experiments.device_work import DeviceWork


@torch.no_grad()
def count_steps(model, ids: torch.Tensor, policy: str, budget: Budget, steps: int,
                codec: str = "full", tokenizer=None) -> tuple[float, float, int]:
    """``(launches, syncs, evictions)`` per decoding step, means over ``steps`` steps after the prefill of ``ids``
    (``[batch, tokens]``, row ``b`` left-padded by ``b * 7`` tokens), the kept entries stored with ``codec``."""
    batch, tokens = ids.shape
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : min(row * 7, tokens - 1)] = 0
    cache = CompressedCache(model, policy, budget, codec=codec, tokenizer=tokenizer)
    with DeviceWork().on_device(model, ids, mask) as work:
        token = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        if cache.policy.has_stage:  # the stage belongs to the prefill, not to the first decoding step
            cache.after_prefill(model)
        work.step()
        prefill_cuts = cache.cuts
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
            token = model(token, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        launches, syncs = work.step()
    return launches / steps, syncs / steps, cache.cuts - prefill_cuts


def step_costs(model, tokenizer, tokens: int, policies: Sequence[str], budgets: Sequence[Budget],
               batches: Sequence[int] = (1, 4, 16), steps: int = 8, tablefmt: str = "github",
               codec: str = "full") -> str:
    """The table: one row per policy × budget × slack, launches and syncs per step at each batch size; the
    policies store their entries with ``codec`` (the full cache, the plain model's own work, never does)."""
    from tabulate import tabulate

    from kvpolicies.experiments.bench import _reference, prompt_ids, reference_first, stored_as

    prompt = prompt_ids(tokenizer, tokens, model.device, model.config.vocab_size)
    reference = _reference()
    rows = []
    for name, budget in reference_first(policies, budgets):
        for slack in (None,) if name == reference else (budget.slack_tokens, 0):
            label = name if slack is None else stored_as(name, codec)
            row = [label, "-", "-"] if slack is None else [label, str(budget), str(slack)]
            for batch in batches:
                try:
                    launches, syncs, cuts = count_steps(
                        model, prompt.expand(batch, -1).clone(), name,
                        budget if slack is None else budget.model_copy(update={"slack_tokens": slack}), steps,
                        codec="full" if slack is None else codec, tokenizer=tokenizer)
                except BudgetError as error:
                    row.append(f"skipped: {error}")
                    continue
                row.append(f"{launches:.0f} / {syncs:.1f}" + (f" ({cuts / steps:.1f} cuts)" if cuts else ""))
            rows.append(row)
    headers = ["policy", "budget", "slack", *(f"batch {batch}: launches / syncs per step" for batch in batches)]
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)
