"""Peak memory of a block of work: what a sweep cell or a benchmark run needed on top of what was already held."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMemory:
    """Peak memory while the block runs: CUDA's allocator peak, or the process's resident set on CPU.

    ``growth_bytes`` is the peak minus what was in use when the block started: the memory this block needed on
    top of what the process already held.

    On CPU the obstacle is the C allocator, not the measurement: freed tensors stay in the process (glibc keeps
    them for reuse), so after a long prompt the next run's growth reads ~0 whatever it allocates. So on entry the
    allocator gives free memory back to the system (``malloc_trim``); then, on Linux, the kernel's exact resident
    high-water mark is reset (``/proc/self/clear_refs``) and read on exit, which no sampling can miss. Where either
    is unavailable (not glibc, not Linux, a locked-down /proc) it falls back to sampling the RSS every 20 ms, a
    lower bound; ``exact`` says which was used.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = self.start_bytes = 0
        self.exact = device.type == "cuda"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def growth_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            return self
        release_free_memory()
        self.exact = reset_high_water_mark()
        self.start_bytes = self.peak_bytes = resident_bytes()
        if not self.exact:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.exact:
            self.peak_bytes = max(self.start_bytes, _status_bytes("VmHWM"))
        else:
            self._stop.set()
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, resident_bytes())
            self._stop.wait(0.02)


def resident_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def release_free_memory() -> None:
    """Return the C allocator's free pages to the system (glibc only; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) to the current RSS; False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
        return _status_bytes("VmHWM") > 0
    except OSError:
        return False


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    return 0


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
