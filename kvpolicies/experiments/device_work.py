"""Counting, on any device, the work a GPU would pay for: kernel launches and host-device synchronisations.

Why count rather than time: the project's GPU path must be right before a GPU is at hand, and on a CPU a
synchronisation costs nothing, so a timing cannot show one. What can be seen on the CPU is the operation that would
synchronise on CUDA: reading a tensor's value on the host (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``),
ops whose output size depends on tensor values (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
``repeat_interleave`` with tensor repeats), and copies between the host and the device (``.cpu()``, a tensor built
from Python numbers for the device). Each aten op that computes something stands for one kernel launch; views and
metadata ops launch nothing.

:class:`DeviceWork` is a ``TorchDispatchMode`` (it sees every aten op, whatever the Python code that called it)
with a ``TorchFunctionMode`` for what only the Python call shows: a factory asked for a device, and the host
reads that a CPU tensor serves without the dispatcher (``tolist``, ``numpy``, ``cpu``). It slows what it counts:
use it in tests and in ``kvpolicies bench --step-costs``, never while timing.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from kvpolicies.engine.paths import shaped_for_gpu

aten = torch.ops.aten

SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
"""Ops that read a device tensor's values on the host, or whose output size does."""

FREE_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.slice.Tensor, aten.select.int, aten.split.Tensor, aten.split_with_sizes.default,
    aten.unbind.int, aten.alias.default, aten.detach.default, aten.as_strided.default, aten.diagonal.default,
    aten.lift_fresh.default, aten.narrow.default, aten.chunk.default, aten.unflatten.int, aten.flatten.using_ints,
    aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default, aten.sym_size.int,
    aten.sym_stride.int, aten.sym_numel.default, aten.is_nonzero.default, aten.size.int, aten.stride.int,
    aten._reshape_alias.default, aten.set_.source_Storage_storage_offset,
}
"""Ops that only reshape, alias or allocate: no kernel runs."""


def _bool_index(func: Any, args: tuple) -> bool:
    """Indexing with a boolean mask (``t[mask]``, ``t[mask] = v``): the output size is the mask's count."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _sized_by_values(func: Any, args: tuple, kwargs: dict) -> bool:
    """``repeat_interleave`` with tensor repeats and no ``output_size`` must read the repeats first."""
    if func not in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor):
        return False
    return kwargs.get("output_size") is None


class DeviceWork(TorchDispatchMode):
    """Counts launches and syncs of the code run under it. ``syncs`` and ``launches`` are totals; ``by_op`` says
    which op each sync came from (for a test's failure message, and for finding the line to fix).

    On a CPU every tensor is a host tensor, yet in a GPU run only some would be on the device: the model's weights,
    its inputs, and everything computed from them, or made with an explicit ``device=``. So the counter follows
    them: tensors given to :meth:`on_device` (the model, its inputs) are device tensors, and so is every output of
    an op that read one or was asked for a device. Work on other tensors (an allocation computed on the host from
    Python numbers) launches nothing and reads nothing back, as on a GPU. Enter it before the prefill, so that the
    cache's tensors are followed from the start, and read :meth:`step` deltas per forward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.launches = 0
        self.syncs = 0
        self.by_op: Counter[str] = Counter()
        self._device: dict[int, weakref.ref] = {}
        """Device tensors by id (tensors compare elementwise, so no set can hold them)."""
        self._last = (0, 0)
        self._functions = _Functions(self)

    def on_device(self, *items: torch.Tensor | torch.nn.Module) -> DeviceWork:
        """Count ``items`` (tensors, or a module's parameters and buffers) as device tensors."""
        for item in items:
            for tensor in [*item.parameters(), *item.buffers()] if isinstance(item, torch.nn.Module) else [item]:
                self._mark(tensor)
        return self

    def step(self) -> tuple[int, int]:
        """``(launches, syncs)`` since the last call (or since the counter started)."""
        now = (self.launches, self.syncs)
        delta = (now[0] - self._last[0], now[1] - self._last[1])
        self._last = now
        return delta

    def _is_device(self, value: Any) -> bool:
        if isinstance(value, torch.Tensor):
            held = self._device.get(id(value))
            return held is not None and held() is value
        if isinstance(value, (list, tuple)):
            return any(self._is_device(item) for item in value)
        return False

    def _mark(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        self._device[key] = weakref.ref(tensor, lambda _, key=key: self._device.pop(key, None))

    def _sync(self, name: str) -> None:
        self.syncs += 1
        self.by_op[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_device = self._is_device(args) or self._is_device(tuple(kwargs.values()))
        out = func(*args, **kwargs)
        if not on_device:
            return out
        if func in SYNC_OPS or _bool_index(func, args) or _sized_by_values(func, args, kwargs):
            self._sync(str(func.overloadpacket.__name__))
        if func not in FREE_OPS:
            self.launches += 1
        for tensor in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self._mark(tensor)
        return out

    def __enter__(self) -> DeviceWork:
        self._gpu_path = shaped_for_gpu()  # count the path a GPU runs, not the CPU's
        self._gpu_path.__enter__()
        self._functions.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._functions.__exit__(*exc)
        self._gpu_path.__exit__(*exc)


HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}
"""Host reads that a CPU tensor serves without the dispatcher: seen as Python calls."""


class _Functions(TorchFunctionMode):
    """The Python-level half of the count. It marks tensors made for a device (``torch.arange(n, device=x.device)``,
    ``torch.tensor(list, device=...)``): only the call says whether a device was asked for, since the dispatcher
    fills in every factory's device. A tensor built from host data for a device is a copy that waits for it (a copy
    from pageable memory is not asynchronous), so it counts as a sync. And it counts host reads of device tensors
    that never reach the dispatcher on a CPU (``tolist``, ``numpy``, ``cpu``)."""

    def __init__(self, work: DeviceWork) -> None:
        super().__init__()
        self.work = work

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS and self.work._is_device(args[0]):
            self.work._sync(func.__name__)
        out = func(*args, **kwargs)
        if kwargs.get("device") is not None and isinstance(out, torch.Tensor):
            if func in (torch.tensor, torch.as_tensor):
                self.work._sync(f"{func.__name__}(device=...)")
            else:
                self.work.launches += 1
            self.work._mark(out)
        return out
