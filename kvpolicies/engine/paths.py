"""Which way a device wants the ragged layers run: one call over a padded copy, or calls over runs in place.

Why two paths: on a GPU a kernel launch costs microseconds and a small-batch decoding step is made of launches, so
the attention over ragged runs (per-head budgets, a padded batch) is one call over a padded copy of the layer,
whatever the batch and head count. On a CPU a call costs little and copying a layer's keys and values every step
costs more than calling once per run (measured in docs/performance.md), so runs are read in place, a block of
runs of one length at a time.
Both paths compute the same attention; tests run both.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_forced = threading.local()


def launch_bound(device: torch.device) -> bool:
    """Whether kernel launches, not memory traffic, bound the work on ``device``: any accelerator, or any device
    inside :func:`shaped_for_gpu`."""
    return device.type != "cpu" or getattr(_forced, "on", False)


@contextmanager
def shaped_for_gpu() -> Iterator[None]:
    """Run ragged layers the way a GPU runs them, on any device (in this thread): what
    :class:`~kvpolicies.experiments.device_work.DeviceWork` counts must be the GPU's path, and tests check it."""
    before = getattr(_forced, "on", False)
    _forced.on = True
    try:
        yield
    finally:
        _forced.on = before
