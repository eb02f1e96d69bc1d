"""CustomOp and OpTable: each op has a PyTorch reference and optional device arms, picked once per model.

In the spirit of vLLM's CustomOp: an op is a small class whose `forward_native` is the pure-PyTorch reference
(any device, any dtype; the test oracle) and whose `forward_cpu` / `forward_cuda` are faster arms with the same
signature and the same result (to float rounding). `select()` builds an OpTable, one bound function per op,
from the device, the dtype and which compiled libraries are available; the model runner activates it around
each forward pass (`lmserve.ops.use`), so model files only ever call `ops.<name>(...)`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from lmserve.ops import cpu_kernels

_REGISTRY: dict[str, "CustomOp"] = {}


class CustomOp:
    """Subclass, set `name`, implement `forward_native`; add `forward_cpu` / `forward_cuda` when there is a kernel.

    A device arm may assume what `select` guarantees for its device: CPU arms run only with dtype float32 and the
    C++ library built (reach it with `cpu_lib()`)."""
    name: str = ""
    forward_cpu = None    # optional: same signature as forward_native
    forward_cuda = None   # optional: same signature as forward_native

    def forward_native(self, *args, **kwargs):
        raise NotImplementedError


def register(cls: type[CustomOp]) -> type[CustomOp]:
    assert cls.name and cls.name not in _REGISTRY, cls.name
    _REGISTRY[cls.name] = cls()
    return cls


def cpu_lib():
    """The compiled CPU kernel module (built on first use), or None."""
    return cpu_kernels._module or cpu_kernels.load()


@dataclass
class OpTable:
    """op name -> the chosen implementation, plus which arm each op got ("native", "cpu", "cuda")."""
    impls: dict[str, Callable] = field(default_factory=dict)
    arms: dict[str, str] = field(default_factory=dict)
    lib: object | None = None      # compiled library behind the non-native arms (None = all native)

    def __getattr__(self, name: str) -> Callable:
        try:
            return self.__dict__["impls"][name]
        except KeyError:
            raise AttributeError(name) from None

    def is_native(self, name: str) -> bool:
        return self.arms[name] == "native"


def select(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, kernels: str = "auto",
           native: frozenset[str] = frozenset(), lib=None) -> OpTable:
    """The op table for a model on `device` in `dtype`.

    kernels="torch" forces every reference; "auto" takes a device arm where one exists, its preconditions hold
    (CPU arms: float32) and its library compiled. `native` names ops forced to their reference anyway. `lib`:
    the compiled CPU module to use (default: build / load it now when CPU arms apply)."""
    device = torch.device(device)
    arm = None
    if kernels == "auto" and device.type == "cpu" and dtype == torch.float32:
        lib = lib if lib is not None else cpu_lib()
        arm = "cpu" if lib is not None else None
    elif kernels == "auto" and device.type == "cuda":
        arm = "cuda"
    table = OpTable(lib=lib if arm == "cpu" else None)
    for name, op in _REGISTRY.items():
        impl = getattr(op, f"forward_{arm}", None) if arm and name not in native else None
        table.impls[name] = impl if impl is not None else op.forward_native
        table.arms[name] = arm if impl is not None else "native"
    if not any(a != "native" for a in table.arms.values()):
        table.lib = None
    table.__dict__.update(table.impls)    # plain attribute hits: ops are called ~10 times per layer per step
    return table


_local = threading.local()
_NATIVE: OpTable | None = None


def native_table() -> OpTable:
    global _NATIVE
    if _NATIVE is None:
        _NATIVE = select(kernels="torch")
    return _NATIVE


def current() -> OpTable:
    """The table active on this thread (the references when none was activated)."""
    table = getattr(_local, "table", None)
    return table if table is not None else native_table()


class use:
    """`with ops.use(table): model(...)`: activate a table on this thread (nests; restores the previous one).

    NOTE: thread-local rather than global, so two engines in one process (each stepping in its own thread)
    cannot see each other's choice."""

    def __init__(self, table: OpTable | None):
        self.table = table

    def __enter__(self) -> OpTable | None:
        self.prev = getattr(_local, "table", None)
        _local.table = self.table
        return self.table

    def __exit__(self, *exc) -> None:
        _local.table = self.prev
