"""Peak memory: the growth a block causes, read from the kernel's high-water mark where Linux offers it."""

import sys
import time

import pytest
import torch

from kvpolicies.engine.memory import PeakMemory, _malloc_trim

MiB = 2**20


def test_growth_counts_memory_allocated_and_freed_inside_the_block():
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(64 * MiB // 4)  # 64 MiB, written so the pages are resident
        del block
    assert peak.growth_bytes >= 60 * MiB
    if sys.platform == "linux":
        assert peak.exact  # read from VmHWM, so a short-lived tensor cannot slip between samples


@pytest.mark.skipif(_malloc_trim() is None, reason="returning freed memory needs glibc's malloc_trim")
def test_a_block_reads_its_own_growth_after_an_earlier_block_freed_more():
    """Freed heap memory is returned on entry, else the next block reuses it and reads ~0 whatever it allocates."""
    raise_threshold = torch.ones(16 * MiB // 4)  # freeing an mmapped chunk raises glibc's mmap threshold to its
    del raise_threshold  # size, so the 1 MiB tensors below come from the heap
    with PeakMemory(torch.device("cpu")):
        pairs = [(torch.ones(MiB // 4), torch.ones(16)) for _ in range(64)]
        pins = [pin for _, pin in pairs]  # small live tensors between the freed ones: holes glibc does not trim
        del pairs
    with PeakMemory(torch.device("cpu")) as small:
        block = [torch.ones(MiB // 4) for _ in range(8)]
        del block
    del pins
    assert 7 * MiB <= small.growth_bytes < 40 * MiB


@pytest.mark.skipif(sys.platform != "linux", reason="the sampling fallback is what other systems use")
def test_falls_back_to_sampling_when_the_high_water_mark_cannot_be_reset(monkeypatch):
    import kvpolicies.engine.memory as memory

    monkeypatch.setattr(memory, "reset_high_water_mark", lambda: False)
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(64 * MiB // 4)
        time.sleep(0.1)  # let the sampler see it
        del block
    assert not peak.exact and peak.growth_bytes >= 60 * MiB
