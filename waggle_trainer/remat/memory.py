"""What one plain training step (no checkpointing) needs, predicted and measured.

Prediction (:func:`predict_step_memory`), in bytes:

* parameters and buffers (resident once the model is built);
* gradients (one per trainable parameter) and optimiser state
  (:func:`waggle_trainer.remat.budget.training_state_bytes`);
* the input batch;
* activations: what autograd keeps for the backward.  Counted exactly, without
  allocating anything, by running the forward and the loss on the ``meta`` device
  under ``torch.autograd.graph.saved_tensors_hooks`` and adding up the distinct
  storages saved (parameters and the input excluded).  Given profiled
  :class:`~waggle_trainer.remat.costs.ChainCosts`, their per-stage ``saved_bytes``
  are used instead;
* workspace: the transient peak on top of that.  In the backward of a stage the
  gradient of its output and of its input are alive together with the tape, so it
  is estimated as twice the largest single saved activation (with a profile: the
  largest measured forward/backward transient).

Measurement (:func:`measure_step_memory`) runs two real SGD steps in a fresh
subprocess with the daemon's allocator settings and reports the peak RSS growth
over the RSS just before the first step (after import, model and optimiser), and
the tensor-level peak (allocations minus frees seen by the torch profiler).

The reference table (:data:`REFERENCE_MB`) is the original study's measurement of
ResNet training memory (MB, presumably on a GPU framework of the time), shown
beside this machine's numbers by ``waggle-trainer memory --table`` and
``bench/memory_table.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

from waggle_trainer.common import (
    ARCHES,
    IMAGE_SIZE_MAX,
    IMAGE_SIZE_MIN,
    batch_too_small,
    format_size,
)
from waggle_trainer.remat.budget import training_state_bytes
from waggle_trainer.remat.optim import STATE_NAMES, make_optimizer, state_multiple

__all__ = [
    "REFERENCE_MB",
    "REFERENCE_IMAGE_MB",
    "StepMemory",
    "MeasuredStep",
    "check_shape",
    "predict_step_memory",
    "profile_costs",
    "measure_step_memory",
    "reference_rows",
]

MB = 2**20

# The study's table: (batch) -> MB for ResNet-18/34/50/101/152 at 224 px.
REFERENCE_MB: dict[int, tuple[float, ...]] = {
    1: (230.05, 413.00, 620.27, 1027.21, 1410.62),
    3: (340.05, 580.42, 1091.11, 1732.33, 2405.14),
    5: (450.06, 747.85, 1561.94, 2437.45, 3399.67),
    10: (725.07, 1166.42, 2739.04, 4200.25, 5885.98),
    30: (1825.13, 2840.70, 7447.42, 11251.43, 15831.23),
    50: (2925.18, 4514.97, 12155.79, 18302.62, 25776.48),
}
# Batch 1, image size -> MB for (ResNet-18, ResNet-50).
REFERENCE_IMAGE_MB: dict[int, tuple[float, float]] = {
    224: (230.05, 620.27),
    350: (309.83, 964.66),
    500: (449.21, 1570.93),
    650: (639.07, 2387.54),
    1100: (1496.10, 6073.06),
    1500: (2628.70, 10944.42),
}

#: Output classes of the models measured here: the study's ImageNet head.
STUDY_CLASSES = 1000


def check_shape(arch: str, batch: int, image: int, optimizer: str = "sgd-momentum") -> None:
    """Raise ValueError naming the bad value and what is allowed."""
    if arch not in ARCHES:
        raise ValueError(f"unknown architecture {arch!r} (allowed: {', '.join(ARCHES)})")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if (
        isinstance(image, bool)
        or not isinstance(image, int)
        or not IMAGE_SIZE_MIN <= image <= IMAGE_SIZE_MAX
    ):
        raise ValueError(
            f"image must be an integer from {IMAGE_SIZE_MIN} to {IMAGE_SIZE_MAX} pixels, "
            f"got {image!r}"
        )
    why = batch_too_small(batch, image)
    if why:
        raise ValueError(f"batch {batch} is too small for image {image} ({why})")
    if optimizer not in STATE_NAMES:
        raise ValueError(f"unknown optimizer {optimizer!r} (allowed: {', '.join(STATE_NAMES)})")


@dataclass(frozen=True)
class StepMemory:
    """Predicted memory of one plain training step, in bytes."""

    arch: str
    batch: int
    image: int
    optimizer: str
    parameter_bytes: int
    buffer_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    input_bytes: int
    activation_bytes: int
    workspace_bytes: int
    source: str

    @property
    def total_bytes(self) -> int:
        return (
            self.parameter_bytes
            + self.buffer_bytes
            + self.gradient_bytes
            + self.optimizer_state_bytes
            + self.input_bytes
            + self.activation_bytes
            + self.workspace_bytes
        )

    @property
    def step_growth_bytes(self) -> int:
        """What a step adds over a process whose model is already built."""
        return self.total_bytes - self.parameter_bytes - self.buffer_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        d["step_growth_bytes"] = self.step_growth_bytes
        return d


def _build(arch: str, num_classes: int):
    from waggle_trainer.remat.chain import build_resnet

    return build_resnet(arch, num_classes)


def profile_costs(
    arch: str,
    batch: int,
    image: int,
    *,
    cache_dir=None,
    num_classes: int = STUDY_CLASSES,
    progress=None,
):
    """Profiled :class:`ChainCosts` of ``arch`` on this machine (runs it for real)."""
    import torch
    import torch.nn.functional as F

    from waggle_trainer.remat.chain import chain_stages
    from waggle_trainer.remat.profiler import profile_chain

    check_shape(arch, batch, image)
    model = _build(arch, num_classes).train()
    target = torch.randint(0, num_classes, (batch,))
    return profile_chain(
        chain_stages(model),
        torch.empty(batch, 3, image, image),
        loss_fn=lambda out: F.cross_entropy(out, target),
        repeats=1,
        cache_dir=cache_dir,
        progress=progress,
    )


def _saved_activations_meta(arch: str, batch: int, image: int, num_classes: int):
    """(activation bytes, largest saved tensor bytes, model) from a meta forward."""
    import torch
    import torch.nn.functional as F

    with torch.device("meta"):
        model = _build(arch, num_classes)
    model.train()
    x = torch.empty(batch, 3, image, image, device="meta")
    exclude = {p.untyped_storage()._cdata for p in model.parameters()}
    exclude.add(x.untyped_storage()._cdata)
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in exclude and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        F.cross_entropy(out, torch.zeros(batch, dtype=torch.long, device="meta"))
    return sum(seen.values()), max(seen.values(), default=0), model


def predict_step_memory(
    arch: str,
    batch: int,
    image: int,
    optimizer: str = "sgd-momentum",
    *,
    num_classes: int = STUDY_CLASSES,
    costs=None,
) -> StepMemory:
    """Predict a plain training step's memory (see the module docstring).

    ``costs``: optional profiled ``ChainCosts`` for this architecture and shape;
    their saved bytes replace the analytic activations.
    """
    check_shape(arch, batch, image, optimizer)
    acts, largest, model = _saved_activations_meta(arch, batch, image, num_classes)
    state = training_state_bytes(model, optimizer)
    input_bytes = batch * 3 * image * image * 4
    source = "meta-device forward (saved tensors)"
    workspace = 2 * largest
    if costs is not None:
        # saved_bytes of stage j holds a[j+1] and excludes a[j]: the sum is every
        # activation but the input.  In the backward of stage j, delta[j+1] (its
        # output's size) and delta[j] (its input's size) are alive beside the tape.
        acts = sum(s.saved_bytes for s in costs.stages)
        sizes = [costs.input_bytes] + [s.output_bytes for s in costs.stages]
        workspace = max(
            [
                max(s.forward_peak_bytes, s.backward_peak_bytes + sizes[j] + sizes[j + 1])
                for j, s in enumerate(costs.stages)
            ]
            or [0]
        )
        source = "profiled chain (saved bytes)"
    return StepMemory(
        arch=arch,
        batch=batch,
        image=image,
        optimizer=state.optimizer,
        parameter_bytes=state.parameter_bytes,
        buffer_bytes=state.buffer_bytes,
        gradient_bytes=state.gradient_bytes,
        optimizer_state_bytes=state.optimizer_state_bytes,
        input_bytes=input_bytes,
        activation_bytes=acts,
        workspace_bytes=workspace,
        source=source,
    )


# ------------------------------------------------------------------ measurement


@dataclass(frozen=True)
class MeasuredStep:
    """A real plain training step, measured in a fresh process."""

    baseline_rss_bytes: int
    peak_rss_bytes: int
    tensor_peak_bytes: int
    step_s: float
    allocator: str

    @property
    def rss_growth_bytes(self) -> int:
        return self.peak_rss_bytes - self.baseline_rss_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rss_growth_bytes"] = self.rss_growth_bytes
        return d


def peak_rss_bytes() -> int:
    """This process's peak RSS: ``VmHWM`` of /proc/self/status.

    Not ``getrusage().ru_maxrss``: Linux carries it across ``execve``, so a child
    started from a large process (a test runner) reports the parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _worker(arch: str, batch: int, image: int, optimizer: str, allocator_mode: str) -> dict:
    import time

    import psutil
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from waggle_trainer.remat.allocator import configure_allocator, trim

    configure_allocator(allocator_mode)
    torch.manual_seed(0)
    model = _build(arch, STUDY_CLASSES)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    key, _ = state_multiple(optimizer)
    name = "sgd" if key == "sgd-momentum" else key
    opt = make_optimizer(params, name, lr=0.01, momentum=0.9 if key == "sgd-momentum" else 0.0)
    if allocator_mode == "trim":
        trim()
    cpu = torch._C._autograd.DeviceType.CPU
    times = []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        # After the profiler started: starting it maps libraries (hundreds of MB of
        # file pages in RSS, sometimes), which are not the step's memory.
        baseline = psutil.Process().memory_info().rss
        for _ in range(2):
            # fresh random data each step: a fixed batch drives gradients subnormal
            x = torch.randn(batch, 3, image, image)
            y = torch.randint(0, STUDY_CLASSES, (batch,))
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            del x, y
            if allocator_mode == "trim":
                trim()
    peak = peak_rss_bytes()
    events = sorted(
        (
            e
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == cpu
        ),
        key=lambda e: e.start_ns(),
    )
    cur = tpeak = 0
    for e in events:
        cur += e.nbytes()
        tpeak = max(tpeak, cur)
    return {
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "tensor_peak_bytes": tpeak,
        "step_s": times[-1],
        "allocator": allocator_mode,
    }


def measure_step_memory(
    arch: str,
    batch: int,
    image: int,
    optimizer: str = "sgd-momentum",
    *,
    allocator: str | None = None,
    threads: int = 2,
    timeout: float = 1800.0,
) -> MeasuredStep:
    """Two real plain training steps in a fresh subprocess; see the module docstring.

    ``allocator``: a mode of :func:`waggle_trainer.remat.allocator.configure_allocator`
    (default: the daemon's).
    """
    from waggle_trainer.remat.allocator import DEFAULT_MODE, MODES

    check_shape(arch, batch, image, optimizer)
    mode = allocator or DEFAULT_MODE
    if mode not in MODES:
        raise ValueError(f"unknown allocator mode {mode!r} (allowed: {', '.join(MODES)})")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    argv = [
        sys.executable,
        "-m",
        "waggle_trainer.remat.memory",
        "--worker",
        json.dumps([arch, batch, image, optimizer, mode]),
    ]
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(
            f"measuring {arch} batch {batch} image {image} failed (exit {p.returncode}): {tail}"
        )
    return MeasuredStep(**json.loads(p.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------ the table


def _reference_cells() -> list[tuple[str, int, int, float]]:
    cells: list[tuple[str, int, int, float]] = []
    for batch, vals in REFERENCE_MB.items():
        for arch, ref in zip(ARCHES, vals, strict=True):
            cells.append((arch, batch, 224, ref))
    for image, (r18, r50) in REFERENCE_IMAGE_MB.items():
        if image == 224:
            continue  # already in the batch table
        cells.append(("resnet18", 1, image, r18))
        cells.append(("resnet50", 1, image, r50))
    return cells


#: ``(arch, batch, image, reference MB)`` of every cell of the study's tables.
REFERENCE_CELLS = _reference_cells()


def reference_rows(
    *,
    measure: bool = False,
    measure_limit_bytes: int = 1536 * MB,
    optimizer: str = "sgd-momentum",
    progress=None,
) -> list[dict]:
    """The study's table beside this machine's prediction (and measurement).

    One dict per cell: ``arch``, ``batch``, ``image``, ``reference_mb``,
    ``predicted`` (StepMemory dict) and, with ``measure``, ``measured``
    (MeasuredStep dict) for cells whose predicted total is at most
    ``measure_limit_bytes``.
    """
    rows = []
    for arch, batch, image, ref in REFERENCE_CELLS:
        pred = predict_step_memory(arch, batch, image, optimizer)
        row = {
            "arch": arch,
            "batch": batch,
            "image": image,
            "reference_mb": ref,
            "predicted": pred.to_dict(),
            "measured": None,
        }
        if measure and pred.total_bytes <= measure_limit_bytes:
            row["measured"] = measure_step_memory(arch, batch, image, optimizer).to_dict()
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def format_rows(rows: list[dict]) -> list[str]:
    """Markdown table lines for :func:`reference_rows`."""
    out = [
        "| arch | batch | image | reference MB | predicted MB | pred/ref | activations MB "
        "| predicted step growth MB | measured RSS growth MB | measured tensor peak MB "
        "| meas/pred |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["predicted"]
        m = r["measured"]
        tot = p["total_bytes"] / MB
        grow = p["step_growth_bytes"] / MB
        if m:
            mg = m["rss_growth_bytes"] / MB
            mt = m["tensor_peak_bytes"] / MB
            meas = f"{mg:.0f} | {mt:.0f} | {mg / grow:.2f}"
        else:
            meas = "- | - | -"
        out.append(
            f"| {r['arch']} | {r['batch']} | {r['image']} | {r['reference_mb']:.2f} | {tot:.0f} "
            f"| {tot / r['reference_mb']:.2f} | {p['activation_bytes'] / MB:.0f} | {grow:.0f} "
            f"| {meas} |"
        )
    return out


def describe(pred: StepMemory, measured: MeasuredStep | None = None) -> list[str]:
    """Human-readable lines for one shape."""
    lines = [
        f"{pred.arch}, batch {pred.batch}, {pred.image}x{pred.image} px, {pred.optimizer}, "
        "plain training (no checkpointing)",
        f"  parameters        {format_size(pred.parameter_bytes):>12}",
        f"  buffers           {format_size(pred.buffer_bytes):>12}",
        f"  gradients         {format_size(pred.gradient_bytes):>12}",
        f"  optimiser state   {format_size(pred.optimizer_state_bytes):>12}",
        f"  input batch       {format_size(pred.input_bytes):>12}",
        f"  activations       {format_size(pred.activation_bytes):>12}  ({pred.source})",
        f"  workspace         {format_size(pred.workspace_bytes):>12}  "
        + (
            "(profiled transients + gradients)"
            if pred.source.startswith("profiled")
            else "(estimate: 2x the largest saved tensor)"
        ),
        f"  total             {format_size(pred.total_bytes):>12}",
        f"  step growth       {format_size(pred.step_growth_bytes):>12}"
        "  (total - parameters - buffers)",
    ]
    if measured is not None:
        g = measured.rss_growth_bytes
        lines += [
            f"measured (fresh process, allocator {measured.allocator!r}, 2 steps):",
            f"  baseline RSS      {format_size(measured.baseline_rss_bytes):>12}"
            "  (after import + model)",
            f"  peak RSS          {format_size(measured.peak_rss_bytes):>12}",
            f"  RSS growth        {format_size(g):>12}"
            f"  ({g / max(1, pred.step_growth_bytes):.2f}x predicted step growth)",
            f"  tensor peak       {format_size(measured.tensor_peak_bytes):>12}"
            f"  ({measured.tensor_peak_bytes / max(1, pred.step_growth_bytes):.2f}x)",
            f"  step time         {measured.step_s:>10.3f} s",
        ]
    return lines


if __name__ == "__main__":  # the measuring subprocess
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        a, b, s, o, m = json.loads(sys.argv[2])
        print(json.dumps(_worker(a, b, s, o, m)))
        sys.exit(0)
    print("usage: python -m waggle_trainer.remat.memory --worker JSON", file=sys.stderr)
    sys.exit(2)
