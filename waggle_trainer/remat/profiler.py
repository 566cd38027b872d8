"""Measure a chain's per-stage costs on this machine (:class:`ChainCosts`).

:func:`profile_chain` runs every stage of the chain on fresh random data (a fixed
batch can drive gradients subnormal and CPU kernels 30x slower) and measures, per
stage: forward time without autograd, forward time with autograd, backward time
(medians over ``repeats`` sweeps after one warm-up sweep), the bytes of its output,
the bytes its autograd tape keeps (``saved_bytes``: unique storages packed by
``saved_tensors_hooks``, excluding the input, parameters and buffers, including the
output) and the transient peaks of forward and backward (bytes of storages created
by the stage's aten ops and alive at once, tracked by a ``TorchDispatchMode`` with
weakref finalizers, minus what survives the call: the output and tape for the
forward, ``delta[j]`` and the parameter gradients - counted by the memory budget as
model memory - for the backward).  Scratch buffers that kernels allocate outside the
dispatcher (e.g. oneDNN workspaces) are not seen.

Tuples (:mod:`.chain`): an activation's bytes are the sum of its tensors'
(:func:`activation_bytes`); a tensor that a stage returns unchanged (the very tensor
it received: same storage, offset, shape and strides) is *passed through*: it is
left out of the stage's tape and recorded in :attr:`.costs.ChainCosts.carried` as
one storage shared by the activations it runs through.  A copy or a view with
another shape is a new tensor (counted again: safe, never under-counted).

The model is left as found: buffers (BatchNorm running statistics,
``num_batches_tracked``) are restored, the global RNG is forked, parameters'
``.grad`` is not touched (gradients are taken with ``torch.autograd.grad``).

With ``cache_dir``, results are cached as JSON keyed by the architecture (a
structural fingerprint of the stages: module types, hyper-parameters, parameter
shapes, training flags), input shape, dtype, torch version and machine (CPU model,
``platform.machine()``, ``torch.get_num_threads()``).  A corrupt cache file is
ignored, re-measured and rewritten with a ``RuntimeWarning``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from waggle_trainer.common import cpu_model

from .chain import Activation, input_needs_grad, tensors_of
from .costs import ChainCosts, StageCost

__all__ = ["profile_chain", "profile_key", "saved_bytes", "activation_bytes", "LiveBytes"]

_cpu_model = cpu_model  # the former name here; bench/adaptation.py (learning) imports it

FORMAT_VERSION = 2  # 2: backward peaks include the largest weight-gradient transient


class LiveBytes(TorchDispatchMode):
    """Track bytes of storages created by aten ops while the mode is active.

    ``live`` is what is still alive, ``peak`` the maximum of ``live``.  A storage is
    new if it aliases none of the op's inputs; it leaves ``live`` when freed (weakref
    finalizer on the storage; torch keeps one Python object per storage).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _free(self, ptr: int, nbytes: int) -> None:
        if ptr in self._tracked:
            self._tracked.discard(ptr)
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in seen or ptr in self._tracked:
                continue
            self._tracked.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, ptr, nbytes)
        return out


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def tensor_bytes(t: torch.Tensor) -> int:
    """What a tensor holds: its storage's bytes (at least ``numel * element_size``,
    which an expanded view's gradient takes)."""
    return max(t.untyped_storage().nbytes(), t.numel() * t.element_size())


def activation_bytes(a: Activation) -> int:
    """Size of an activation: the sum of :func:`tensor_bytes` over its tensors."""
    return sum(tensor_bytes(t) for t in tensors_of(a))


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or bool(
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def passed_through(inp: Activation, out: Activation) -> list[int | None]:
    """For each tensor of ``out``, the position of the tensor of ``inp`` it is (each
    input tensor matched once), or None for a new one."""
    free = list(enumerate(tensors_of(inp)))
    result: list[int | None] = []
    for o in tensors_of(out):
        hit = next((k for k, (_, t) in enumerate(free) if _same_tensor(o, t)), None)
        result.append(None if hit is None else free.pop(hit)[0])
    return result


def _excluded(stage: nn.Module, inp: Activation) -> set[int]:
    ptrs = {t.untyped_storage().data_ptr() for t in tensors_of(inp)}
    ptrs.update(p.untyped_storage().data_ptr() for p in stage.parameters())
    ptrs.update(b.untyped_storage().data_ptr() for b in stage.buffers())
    return ptrs


def saved_bytes(stage: nn.Module, inp: Activation) -> tuple[Activation, int]:
    """Run ``stage(inp)`` with autograd; return its output and the tape's bytes.

    The tape's bytes are the unique storages saved for backward that are not the
    output's, excluding ``inp``'s storages and the stage's parameters and buffers,
    plus the output's tensors (:func:`tensor_bytes`) except those passed through
    unchanged from ``inp``.  A new output tensor is counted even when it is a view of
    the input (``Flatten``): the memory model books ``a[j+1]`` apart from ``a[j]``.
    ``inp`` should require grad (or the stage have parameters) for a tape to exist.
    """
    excluded = _excluded(stage, inp)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage_key(t)
        if ptr not in excluded:
            storages[ptr] = nbytes
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = stage(inp)
    outputs = tensors_of(out, f"the output of {type(stage).__name__}")
    new = [t for t, p in zip(outputs, passed_through(inp, out), strict=True) if p is None]
    out_ptrs = {t.untyped_storage().data_ptr() for t in outputs}
    tape = sum(nbytes for ptr, nbytes in storages.items() if ptr not in out_ptrs)
    return out, tape + sum(tensor_bytes(t) for t in new)


def _fingerprint(stages: Sequence[nn.Module]) -> str:
    lines = []
    for j, stage in enumerate(stages):
        for name, m in stage.named_modules():
            t = type(m)
            kind = f"{t.__module__}.{t.__qualname__}"
            lines.append(f"{j}/{name}:{kind}({m.extra_repr()}) train={m.training}")
            for pname, p in m.named_parameters(recurse=False):
                lines.append(f"  p {pname} {tuple(p.shape)} {p.dtype} grad={p.requires_grad}")
            for bname, b in m.named_buffers(recurse=False):
                lines.append(f"  b {bname} {tuple(b.shape)} {b.dtype}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _shape_key(sample: Activation) -> dict:
    """The input's shape, dtype and grad flag (a tensor's fields as before; lists of
    them for a tuple)."""
    tensors = tensors_of(sample, "sample_input")
    if isinstance(sample, torch.Tensor):
        return {
            "input_shape": list(sample.shape),
            "dtype": str(sample.dtype),
            "input_requires_grad": bool(sample.requires_grad),
        }
    return {
        "input_shape": [list(t.shape) for t in tensors],
        "dtype": [str(t.dtype) for t in tensors],
        "input_requires_grad": [bool(t.requires_grad) for t in tensors],
    }


def profile_key(stages: Sequence[nn.Module], sample_input: Activation, loss_fn=None) -> dict:
    """The fields a cached profile is valid for (JSON-serialisable)."""
    return {
        "format": FORMAT_VERSION,
        "architecture": _fingerprint(stages),
        **_shape_key(sample_input),
        "device": tensors_of(sample_input)[0].device.type,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "loss": None
        if loss_fn is None
        else getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__),
    }


def _fresh(sample: Activation) -> Activation:
    def one(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() or t.is_complex():
            return torch.randn_like(t).requires_grad_(t.requires_grad)
        return t.detach().clone()

    out = tuple(one(t) for t in tensors_of(sample))
    return out if isinstance(sample, tuple) else out[0]


def _with_grad(a: Activation, flags: bool | Sequence[bool]) -> Activation:
    """``a`` detached, its floating tensors requiring grad as ``flags`` says."""
    tensors = tensors_of(a)
    if isinstance(flags, bool):
        flags = [flags] * len(tensors)
    out = tuple(
        t.detach().requires_grad_(f and (t.is_floating_point() or t.is_complex()))
        for t, f in zip(tensors, flags, strict=True)
    )
    return out if isinstance(a, tuple) else out[0]


class _Parts:
    """Which storages the activations of a sweep share (:attr:`ChainCosts.carried`)."""

    def __init__(self, x: Activation) -> None:
        self.parts = [[0, 0, tensor_bytes(t)] for t in tensors_of(x)]  # first, last, bytes
        self.ids = list(range(len(self.parts)))

    def step(self, j: int, inp: Activation, out: Activation) -> None:
        ids = []
        for t, p in zip(tensors_of(out), passed_through(inp, out), strict=True):
            if p is None:
                self.parts.append([j + 1, j + 1, tensor_bytes(t)])
                ids.append(len(self.parts) - 1)
            else:
                self.parts[self.ids[p]][1] = j + 1
                ids.append(self.ids[p])
        self.ids = ids

    def carried(self) -> tuple[tuple[int, int, int], ...]:
        spans: dict[tuple[int, int], int] = {}
        for first, last, nbytes in self.parts:
            if last > first:
                spans[(first, last)] = spans.get((first, last), 0) + nbytes
        return tuple((f, l, b) for (f, l), b in sorted(spans.items()))


def _sweep(stages, x, needs_grad, loss_fn, measure_memory: bool, tick=None):
    """One pass over the chain; returns per-stage dicts, the loss time and (measuring
    memory) the storages the activations share."""
    rows = []
    a = x
    parts = _Parts(x) if measure_memory else None
    input_flags = [t.requires_grad for t in tensors_of(x)]
    for j, stage in enumerate(stages):
        if tick is not None:
            tick()
        row: dict = {}
        mode = LiveBytes() if measure_memory else None
        # forward without autograd
        t0 = time.perf_counter()
        with torch.no_grad():
            if mode is not None:
                with mode:
                    out = stage(a)
            else:
                out = stage(a)
        row["forward_s"] = time.perf_counter() - t0
        if mode is not None:
            row["output_bytes"] = activation_bytes(out)
            fn_transient = mode.peak - mode.live
            assert parts is not None
            parts.step(j, a, out)
        # forward with autograd
        inp = _with_grad(a, input_flags if j == 0 else needs_grad[j])
        t0 = time.perf_counter()
        if mode is not None:
            mode = LiveBytes()
            with mode:
                tape_out, row["saved_bytes"] = saved_bytes(stage, inp)
            row["forward_peak_bytes"] = max(fn_transient, mode.peak - mode.live, 0)
        else:
            with torch.enable_grad():
                tape_out = stage(inp)
        row["forward_grad_s"] = time.perf_counter() - t0
        # backward from a fresh random delta[j+1]
        wrt_inputs = [t for t in tensors_of(inp) if t.requires_grad]
        params = [p for p in stage.parameters() if p.requires_grad]
        roots = [t for t in tensors_of(tape_out) if t.requires_grad]
        row["backward_s"], row["backward_peak_bytes"] = 0.0, 0
        if roots and wrt_inputs + params:
            deltas = [torch.randn_like(t) for t in roots]
            mode = LiveBytes() if measure_memory else None
            t0 = time.perf_counter()
            if mode is not None:
                with mode:
                    grads = torch.autograd.grad(
                        roots, wrt_inputs + params, deltas, allow_unused=True
                    )
                # + the largest weight gradient: training accumulates into an existing
                # ``.grad``, so each new gradient is a transient until it is added.
                largest = max((p.numel() * p.element_size() for p in params), default=0)
                row["backward_peak_bytes"] = max(mode.peak - mode.live, 0) + largest
            else:
                grads = torch.autograd.grad(roots, wrt_inputs + params, deltas, allow_unused=True)
            row["backward_s"] = time.perf_counter() - t0
            del grads, deltas
        del tape_out, inp, roots, wrt_inputs
        rows.append(row)
        a = out
    loss_s = 0.0
    if loss_fn is not None:
        inp = _with_grad(a, True)
        t0 = time.perf_counter()
        with torch.enable_grad():
            loss = loss_fn(inp)
            torch.autograd.grad(loss, [t for t in tensors_of(inp) if t.requires_grad])
        loss_s = time.perf_counter() - t0
    return rows, loss_s, (parts.carried() if parts is not None else ())


def _measure(stages, names, sample_input, loss_fn, repeats, progress=None) -> ChainCosts:
    needs_grad = input_needs_grad(
        stages, any(t.requires_grad for t in tensors_of(sample_input, "sample_input"))
    )
    total = len(stages) * (1 + repeats)
    done = 0

    def tick() -> None:
        nonlocal done
        if progress is not None:
            progress(done, total)
        done += 1

    buffers = {id(b): b for stage in stages for b in stage.buffers()}
    saved = [(b, b.detach().clone()) for b in buffers.values()]
    first = tensors_of(sample_input)[0]
    devices = [first.device.index or 0] if first.is_cuda else []
    started = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=devices):
            memory_rows, _, carried = _sweep(
                stages, _fresh(sample_input), needs_grad, loss_fn, measure_memory=True, tick=tick
            )
            timed = [
                _sweep(stages, _fresh(sample_input), needs_grad, loss_fn, False, tick)[:2]
                for _ in range(repeats)
            ]
    finally:
        if progress is not None:
            progress(total, total)
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
    med = lambda key, j: statistics.median(rows[j][key] for rows, _ in timed)
    stage_costs = tuple(
        StageCost(
            name=names[j],
            forward_s=med("forward_s", j),
            forward_grad_s=med("forward_grad_s", j),
            backward_s=med("backward_s", j),
            output_bytes=int(memory_rows[j]["output_bytes"]),
            saved_bytes=int(memory_rows[j]["saved_bytes"]),
            forward_peak_bytes=int(memory_rows[j]["forward_peak_bytes"]),
            backward_peak_bytes=int(memory_rows[j]["backward_peak_bytes"]),
        )
        for j in range(len(stages))
    )
    return ChainCosts(
        input_bytes=activation_bytes(sample_input),
        stages=stage_costs,
        loss_s=statistics.median(loss for _, loss in timed),
        meta={
            "repeats": repeats,
            "profile_s": round(time.perf_counter() - started, 3),
            "created": time.time(),
        },
        carried=carried,
    )


def profile_chain(
    stages: Sequence[nn.Module],
    sample_input: Activation,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    repeats: int = 3,
    cache_dir: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ChainCosts:
    """Profile ``stages`` (a chain, see :mod:`.chain`) for inputs like ``sample_input``
    (a tensor or a tuple of tensors).

    Only the shape, dtype, device and ``requires_grad`` of ``sample_input`` are used
    (floating inputs are replaced by fresh ``randn`` data each sweep).  ``loss_fn``
    maps the chain's output to a scalar; its forward+backward time is ``loss_s``
    (0 without it).  Stages are profiled in their current ``training`` mode.  The
    model's parameters, gradients, buffers and the global RNG are unchanged after.
    ``meta`` of the result holds the cache key fields and ``stage_names``.
    ``progress(done, total)`` is called before each stage is measured and once with
    ``done == total`` at the end (not at all on a cache hit).
    """
    stages = list(stages)
    if not stages:
        raise ValueError("cannot profile an empty chain")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    names = (
        list(names)
        if names is not None
        else [f"{j}:{type(s).__name__}" for j, s in enumerate(stages)]
    )
    key = profile_key(stages, sample_input, loss_fn)
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"profile-{digest}.json"
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data["key"] != key:
                    raise ValueError("key mismatch")
                costs = ChainCosts.from_dict(data["costs"])
                if len(costs) != len(stages):
                    raise ValueError("wrong number of stages")
                return costs
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                warnings.warn(
                    f"ignoring corrupt profile cache {path} ({exc}); re-profiling",
                    RuntimeWarning,
                    stacklevel=2,
                )
    costs = _measure(stages, names, sample_input, loss_fn, repeats, progress)
    costs = replace(costs, meta={**costs.meta, **key, "stage_names": names})
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".profile-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"key": key, "costs": costs.to_dict()}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return costs
