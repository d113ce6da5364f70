"""Counting the host syncs of a training step: ``SyncCounter``, a callback added to a real
``run.py`` through Hydra overrides (``syncs(out)``), with a ``TorchDispatchMode`` over the fit.

Counted are the ops whose result the host must read before it can go on, each of which waits
for the device on a GPU:

- ``aten._local_scalar_dense`` (what ``.item()``, ``bool()``, ``int()``, ``float()`` call) and
  ``aten.equal`` (a bool);
- ops whose output size depends on the data: ``nonzero``, ``unique`` (every variant),
  ``bincount`` (CUDA's reads the maximum even with ``minlength``), ``repeat_interleave`` without
  ``output_size``, ``masked_select`` and indexing with a boolean mask (``index``/``index_put``).

Also counted, apart (``host_data``): ``aten.lift_fresh``, a tensor made from Python data
(``torch.tensor(x)``); on a GPU, made on the device, it is a blocking host-to-device copy.

Listed apart (``host_made``): tensors made by a factory (``torch.arange``, ``zeros``, ...)
with no device named, seen by a ``TorchFunctionMode``: on a GPU they are made on the host, and
a step that uses them on the device copies them there.

Not counted (``host``): what the optimiser reads and makes of its step counts, which torch's
Adam keeps on the host unless ``capturable``/``fused`` (reading them waits for nothing).

``device_batches``: build the dense batches with the GPU's code path (``gathered_events``, one
gather with the batch size known) on the CPU too, so that the count covers what a GPU runs.

Ops are attributed to a phase by Lightning's hooks: ``train_batch`` (the datamodule's
``on_after_batch_transfer``: the batch built from the store on the training device),
``train_step`` (``on_train_batch_start`` to ``on_train_batch_end``: forward, loss, metrics,
logging, backward, optimiser), ``val_batch``, ``val_step``, and ``other`` (data loading on the
host, epoch ends, checkpoints). Each hit keeps the innermost project (or Lightning/torchmetrics)
frame that led to it, so a failure says where the sync comes from.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNC_OPS = {
    aten._local_scalar_dense, aten.equal, aten.nonzero, aten.bincount, aten.masked_select,
    aten.unique_dim, aten.unique_consecutive, aten._unique, aten._unique2,
    aten.unique_dim_consecutive,
}  # fmt: skip
HOST_DATA = {aten.lift_fresh, aten.lift_fresh_copy}
PHASES = ("train_batch", "train_step", "val_batch", "val_step", "other")


def _is_sync(func, args, kwargs) -> bool:
    packet = func.overloadpacket
    if packet in SYNC_OPS:
        return True
    if packet is aten.repeat_interleave:
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
        )
    return False


def _where() -> str:
    """The innermost frame of the code that made the op (not torch itself, not this file)."""
    frames = traceback.extract_stack()[:-3]
    for f in reversed(frames):
        name = f.filename.replace("\\", "/")
        if "/torch/" in name or name.endswith("tests/syncs.py"):
            continue
        short = "/".join(name.split("/")[-2:])
        return f"{short}:{f.lineno} {f.name}"
    return "?"


def _in_optimiser(stack) -> bool:
    """Whether the op comes from inside ``torch.optim`` (Adam making its step counts)."""
    return any("/torch/optim/" in f.filename.replace("\\", "/") for f in stack[-8:])


class _Mode(TorchDispatchMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs) or func.overloadpacket in HOST_DATA:
            kind = "sync" if func.overloadpacket not in HOST_DATA else "host_data"
            if self.counter.optimiser_step_count(args) or (
                kind == "host_data" and _in_optimiser(traceback.extract_stack())
            ):
                kind = "host"
            self.counter.hit(kind, func, _where())
        return func(*args, **kwargs)


FACTORIES = {
    torch.arange, torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor,
    torch.linspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm,
}  # fmt: skip


class _Factories(TorchFunctionMode):
    """Tensors made with no device named: on a GPU they are made on the host, and a step that
    uses them on the device copies them there (a blocking copy unless pinned)."""

    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            stack = traceback.extract_stack()
            if not _in_optimiser(stack):
                self.counter.hit("host_made", func, _where())
        return func(*args, **kwargs)


class SyncCounter(pl.Callback):
    """Counts host syncs per phase over ``fit`` and writes them to ``out`` (JSON) at its end:
    ``{"steps": n, "val_steps": m, "hits": [{"kind", "phase", "op", "where", "step"}, ...]}``
    (``step``: the training step the hit belongs to, counted from 1 over the whole fit)."""

    def __init__(self, out: str, device_batches: bool = True) -> None:
        self.out, self.device_batches = Path(out), device_batches
        self.phase = "other"
        self.steps = self.val_steps = 0
        self.hits: list[dict] = []
        self.modes: list = []
        self.trainer = None

    def hit(self, kind: str, func, where: str) -> None:
        op = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else func.__name__
        step = self.steps + (self.phase == "train_batch")  # a batch is built before its step
        self.hits.append(dict(kind=kind, phase=self.phase, op=op, where=where, step=step))

    def optimiser_step_count(self, args) -> bool:
        """Whether the op reads an optimiser's step count (kept on the host)."""
        if self.trainer is None or not args:
            return False
        states = (s for opt in self.trainer.optimizers for s in opt.state.values())
        return any(args[0] is s.get("step") for s in states)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if self.device_batches:
            import datamodules.batches as batches

            batches.sliced_events = batches.gathered_events
        dm = trainer.datamodule
        build = dm.on_after_batch_transfer

        def on_after_batch_transfer(batch, dataloader_idx):
            before = self.phase
            self.phase = "train_batch" if trainer.training else "val_batch"
            try:
                return build(batch, dataloader_idx)
            finally:
                self.phase = before

        dm.on_after_batch_transfer = on_after_batch_transfer

    def on_fit_start(self, trainer, pl_module) -> None:
        self.trainer = trainer
        self.modes = [_Factories(self), _Mode(self)]
        for mode in self.modes:
            mode.__enter__()

    def on_fit_end(self, trainer, pl_module) -> None:
        for mode in reversed(self.modes):
            mode.__exit__(None, None, None)
        self.modes = []
        data = {"steps": self.steps, "val_steps": self.val_steps, "hits": self.hits}
        self.out.write_text(json.dumps(data, indent=1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps += 1
        self.phase = "train_step"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.phase = "other"

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dl_idx=0) -> None:
        self.val_steps += 1
        self.phase = "val_step"

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dl_idx=0
    ) -> None:
        self.phase = "other"


def syncs(out) -> list[str]:
    """Hydra overrides that add a ``SyncCounter`` writing to ``out``."""
    return ["+callbacks.syncs._target_=tests.syncs.SyncCounter", f"+callbacks.syncs.out={out}"]
