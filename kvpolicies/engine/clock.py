"""Reading the time of work that may still be queued on a device.

CUDA runs asynchronously: a host clock read right after launching work measures the launches, not the work. Two
ways to time it, for two needs:

- :func:`clock` synchronises the device, then reads the host clock: for the edges of a whole measured block
  (a prefill, a run of decoding steps), where one sync costs nothing against what is timed.
- :class:`Stopwatch` accumulates a section that repeats inside the block (the policy's share of every layer's
  forward) with CUDA events on CUDA: recording an event does not wait for the device, so timing the section does
  not change the speed of the run it is part of. The events are read, with one sync, only when the total is asked.
  On other devices it reads the host clock, which is exact there.
"""

from __future__ import annotations

import time

import torch


def clock(device: torch.device | str | None = None) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` (a CUDA device) has finished."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Stopwatch:
    """Seconds spent between :meth:`start` and :meth:`stop`, summed over every time the section ran."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self) -> object:
        if self.cuda:
            return self._event()
        return time.perf_counter()

    def stop(self, started: object) -> None:
        if self.cuda:
            self._events.append((started, self._event()))
        else:
            self._seconds += time.perf_counter() - started

    @property
    def seconds(self) -> float:
        """The total so far (on CUDA, one sync to read the events recorded since the last call)."""
        if self._events:
            torch.cuda.synchronize(self.device)
            self._seconds += sum(begin.elapsed_time(end) for begin, end in self._events) / 1000
            self._events.clear()
        return self._seconds

    def _event(self) -> torch.cuda.Event:
        """An event recorded on the stream of this stopwatch's device (not the current device's, which may differ:
        ``--device cuda:1``)."""
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def reset(self) -> None:
        self._events.clear()
        self._seconds = 0.0
