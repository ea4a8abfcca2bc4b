"""What a GPU would pay, counted on the CPU: host-device syncs per decoding step and per eviction.

The counter follows the tensors a GPU run would hold on the device (the model's weights, its inputs and what is
computed from them); these tests pin the invariants of the hot path: no sync while decoding between evictions, and a
number per eviction that does not grow with the batch.
"""

from __future__ import annotations

import pytest
import torch

import kvpolicies
from kvpolicies import Budget, CompressedCache
from kvpolicies.experiments.device_work import DeviceWork
from tests.helpers import tiny_llama


def test_host_reads_of_device_tensors_are_syncs_and_host_tensors_are_not():
    device, host = torch.ones(4), torch.ones(4)
    with DeviceWork().on_device(device) as work:
        host.sum().item(), host.tolist(), host[host > 0]
        assert work.syncs == 0
        total = device.sum()
        total.item()
        device.tolist()
        device[device > 0]
        device.nonzero()
        torch.tensor([1, 2], device=device.device)
    assert work.syncs == 5, work.by_op
    assert {"_local_scalar_dense", "tolist", "index", "nonzero", "tensor(device=...)"} == set(work.by_op)
    assert work.launches >= 4  # sum, gt, index, nonzero (and the tensor's copy)


def decode_work(policy: str, batch: int, padding: int, slack: int, layers: int = 8, steps: int = 3,
                evictions: list | None = None, launches: list | None = None, codec=None,
                budget: float = 0.5, model=None) -> list[int]:
    """Syncs of each of ``steps`` decoding steps after a 64-token prefill (the first row never padded); the number
    of layers cut while decoding is appended to ``evictions``, the launches of each step to ``launches``. ``model``:
    a tiny Llama of ``layers`` layers unless given."""
    torch.manual_seed(0)
    model = model or tiny_llama(num_layers=layers)
    ids = torch.randint(3, model.config.vocab_size, (batch, 64), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1:, :padding] = 0
    cache = CompressedCache(model, kvpolicies.get_policy(policy), Budget(value=budget, slack_tokens=slack), codec=codec)
    syncs = []
    with torch.no_grad(), DeviceWork().on_device(model, ids, mask) as work:
        token = model(ids, attention_mask=mask, cache=cache).logits[:, -1:].argmax(-1)
        work.step()
        prefill_cuts = cache.cuts
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], 1)
            token = model(token, attention_mask=mask, cache=cache).logits[:, -1:].argmax(-1)
            launched, synced = work.step()
            syncs.append(synced)
            if launches is not None:
                launches.append(launched)
    if evictions is not None:
        evictions.append(cache.cuts - prefill_cuts)
    return syncs


@pytest.mark.parametrize(("policy", "batch", "padding"), [
    ("snapkv", 1, 0), ("snapkv", 4, 5), ("headkv", 1, 0), ("h2o", 4, 5), ("streaming", 4, 5),
])
def test_a_decoding_step_between_evictions_syncs_no_more_than_the_models_own(policy, batch, padding):
    own = decode_work("full", batch, padding, slack=16)  # transformers reads the padding mask once per forward
    assert own == [1, 1, 1]
    assert decode_work(policy, batch, padding, slack=16) == own  # no layer reads anything back


@pytest.mark.parametrize("policy", ["full", "snapkv"])
def test_a_padded_prefill_reads_its_padding_once_not_once_per_layer(policy):
    """Which new tokens are real is read from the device once per forward pass (``engine/step.py``), for all the
    layers: a deeper model pays no more for it. (An eviction's own reads are per layer; they are counted apart.)"""
    counted = {}
    for layers in (4, 8):
        model = tiny_llama(num_layers=layers)
        ids = torch.randint(3, 128, (4, 48), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1:, :5] = 0
        cache = CompressedCache(model, policy, 0.5)
        with torch.no_grad(), DeviceWork().on_device(model, ids, mask) as work:
            model(ids, attention_mask=mask, cache=cache)
        counted[layers] = work.syncs - 3 * cache.cuts  # less 3 reads per eviction (tested below)
    assert counted[4] == counted[8], counted


@pytest.mark.parametrize("policy", ["snapkv", "headkv", "h2o"])
def test_syncs_per_eviction_do_not_grow_with_the_batch_or_its_padding(policy):
    per_eviction = []
    for batch, padding in ((1, 0), (4, 5), (16, 9)):
        own = sum(decode_work("full", batch, padding, slack=0))
        cuts: list = []
        ours = sum(decode_work(policy, batch, padding, slack=0, evictions=cuts))  # slack 0: a cut at most steps
        assert cuts[0] > 0
        per_eviction.append((ours - own) / cuts[0])
    # The allocation's upload, the scores' NaN check, the kept count of every run, and for a policy that moves
    # entries between heads one read of the checks on its move: whatever the batch and its padding.
    assert len(set(per_eviction)) == 1 and per_eviction[0] <= (4 if policy == "headkv" else 3), per_eviction


@pytest.mark.parametrize("policy", ["snapkv", "headkv", "h2o"])
def test_launches_per_decoding_step_do_not_grow_with_the_batch_on_ragged_layers(policy):
    # A padded batch makes every layer ragged (runs of different lengths); H2O also tracks attention per entry.
    per_step = {}
    for batch in (4, 16):
        launches: list = []
        decode_work(policy, batch, padding=5 if batch == 4 else 9, slack=16, launches=launches)
        per_step[batch] = launches
    assert per_step[4] == per_step[16], per_step  # one attention call per layer: not one per (sequence, KV head)
    full: list = []
    decode_work("full", 16, 9, slack=16, launches=full)
    extra = (per_step[16][0] - full[0]) / 8  # per layer, over the plain model's own step
    assert 0 < extra <= (70 if policy == "h2o" else 30), per_step  # its attention track: ~66


def test_the_step_costs_table_counts_the_plain_model_once_and_each_policy_at_both_slacks():
    from kvpolicies.experiments.step_costs import step_costs

    table = step_costs(tiny_llama(), None, 96, ["snapkv"], [Budget.parse(0.25)], batches=(1, 4), steps=2)
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert [[cell.strip() for cell in row[:3]] for row in rows] == [["full", "-", "-"], ["snapkv", "0.25", "16"],
                                                                    ["snapkv", "0.25", "0"]]
    assert all(cell.strip().endswith("/ 1.0") for cell in rows[0][3:])  # the model's own sync per step
    assert "cuts" in rows[2][3] and "cuts" not in rows[1][3]  # slack 0 evicts while decoding, the default does not


def test_timing_the_policy_on_cuda_records_events_and_syncs_once_when_the_total_is_read(monkeypatch):
    """Before, every layer's forward synchronised the device twice to time the policy, in the very run whose speed
    was reported. CUDA's events stand in here: recorded per layer, read with one sync at the end."""
    from kvpolicies.engine.clock import Stopwatch

    syncs = []

    class Event:  # what a CUDA event does: remembers when it was recorded, answers the time between two
        def __init__(self, enable_timing: bool) -> None:
            self.at = None

        def record(self, stream: str | None = None) -> None:
            assert stream == "stream of cuda"  # the device's own stream, whatever device is current
            self.at = len(recorded)
            recorded.append(self)

        def elapsed_time(self, end: Event) -> float:
            return 2.0  # milliseconds

    recorded: list = []
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    model = tiny_llama()
    cache = CompressedCache(model, "snapkv", Budget(value=0.5, slack_tokens=0))
    cache.policy_time = Stopwatch("cuda")
    with torch.no_grad():
        token = model(torch.randint(3, 128, (1, 64)), cache=cache).logits[:, -1:].argmax(-1)
        model(token, cache=cache)
    assert syncs == [] and len(recorded) == 2 * 2 * 8  # two forwards, eight layers, a start and a stop each
    assert cache.policy_time.seconds == pytest.approx(16 * 0.002) and syncs == ["cuda"]


@pytest.mark.parametrize("architecture", ["gemma3", "mistral-sliding-window"])
@pytest.mark.parametrize("policy", ["snapkv", "h2o"])
def test_packed_sliding_windows_decode_without_a_sync_between_evictions(architecture, policy):
    """Windows that share the budget are packed, and each step hides what slid out by the entries' positions, on
    the device: a step syncs no more than the model's own, until a run outgrows its window plus the slack."""
    from tests.architectures import ARCHITECTURES, build, prompt

    model = build(ARCHITECTURES[architecture])
    ids = prompt(40)
    counted = {}
    for name in ("full", policy):
        cache = CompressedCache(model, kvpolicies.get_policy(name), Budget(value=0.5, slack_tokens=16))
        syncs = []
        with torch.no_grad(), DeviceWork().on_device(model, ids) as work:
            token = model(ids, cache=cache).logits[:, -1:].argmax(-1)
            work.step()
            for _ in range(4):  # 8-token windows: entries slide out of the packed windows at every step
                token = model(token, cache=cache).logits[:, -1:].argmax(-1)
                syncs.append(work.step()[1])
        counted[name] = syncs
        if name == policy:
            assert all(layer.packed for layer in cache.layers)
    assert counted[policy] == counted["full"]


def test_what_slides_out_of_a_packed_window_is_dropped_at_most_once_per_slack_and_one_read_a_time(monkeypatch):
    """With a question kept whole no eviction runs while decoding: the windows drop what slid out on their own, one
    host read each time, and no more often than once every slack + 1 steps per layer."""
    from kvpolicies.engine.storage import CompressedLayer
    from tests.architectures import ARCHITECTURES, WINDOW, build, prompt

    model = build(ARCHITECTURES["mistral-sliding-window"])
    slack, steps = 2, 3 * WINDOW
    cache = CompressedCache(model, kvpolicies.get_policy("snapkv"), Budget(value=0.5, slack_tokens=slack))
    cache.context_lengths = [30]
    drops: list[tuple[int, int]] = []
    original = CompressedLayer.drop_slid_out

    def counted(layer):
        with DeviceWork().on_device(model) as work:
            original(layer)
        drops.append((layer.layer_idx, work.syncs))

    monkeypatch.setattr(CompressedLayer, "drop_slid_out", counted)
    ids = prompt(40)
    with torch.no_grad():
        model(ids[:, :30], cache=cache)
        model(ids[:, 30:], cache=cache)
        for token in range(steps):
            model(torch.tensor([[3 + token]]), cache=cache)
    per_layer = {layer: [syncs for index, syncs in drops if index == layer] for layer, _ in drops}
    assert set(per_layer) == set(cache.shape.sliding_layers)
    for syncs in per_layer.values():
        assert all(count == 1 for count in syncs)
        assert 1 <= len(syncs) <= (10 + steps) // (slack + 1) + 1


@pytest.mark.parametrize("architecture", ["gemma3", "mistral-sliding-window"])
def test_an_eviction_in_a_window_reads_no_more_than_anywhere_else_sinks_and_slid_out_entries_included(architecture):
    """A window's sinks (per sequence, a short prompt's still in its window) travel with the eviction's one upload,
    and what slid out goes with the cut: per eviction the same reads as a model without windows (see above)."""
    from tests.architectures import ARCHITECTURES, build

    model = build(ARCHITECTURES[architecture])
    ids = torch.randint(3, 96, (2, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :25] = 0  # 5 real tokens: its window still holds its first ones, the other row's does not
    counted = {}
    for name in ("full", "streaming"):
        cache = CompressedCache(model, kvpolicies.get_policy(name, sink_tokens=2) if name == "streaming" else name,
                                Budget(value=0.5, slack_tokens=0))
        step_mask = mask
        with torch.no_grad(), DeviceWork().on_device(model, ids, mask) as work:
            token = model(ids, attention_mask=step_mask, cache=cache).logits[:, -1:].argmax(-1)
            work.step()
            before = cache.cuts
            for _ in range(6):
                step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=step_mask.dtype)], 1)
                token = model(token, attention_mask=step_mask, cache=cache).logits[:, -1:].argmax(-1)
            syncs = work.step()[1]
        counted[name] = (syncs, cache.cuts - before)
    (own, _), (ours, cuts) = counted["full"], counted["streaming"]
    assert cuts > 0 and (ours - own) / cuts <= 3, counted
