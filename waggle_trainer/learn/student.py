"""The student: a torchvision ResNet trunk plus a task head, as a chain of stages.

* **detect**: the ResNet's stem and residual blocks up to ``layer3`` (stride 16) or
  ``layer4`` (stride 32; ``[student] trunk_stride``), then a U-Net-style decoder of
  2x up-sampling blocks to stride 4 or 8 (``head_stride``), each merging the trunk's
  feature map of its resolution through a 1x1 lateral convolution (small, distant
  people live in the stride-4/8 features; a decoder from stride 16 alone measured
  0.611 AP50 against human boxes where this one reached 0.731, same recipe), and a
  CenterNet-style head (Zhou et al., *Objects as Points*, 2019) whose output has
  ``C + 4`` channels: one centre heat-map (logits) per class, then box width and
  height and the centre's sub-cell offset, all in output cells (see
  :mod:`waggle_trainer.learn.detection`).  Built as an ``nn.Sequential`` of the
  trunk's own modules; the layers whose input a decoder block merges are wrapped in
  :class:`~waggle_trainer.remat.chain.KeepInput` and the decoder blocks in
  :class:`~waggle_trainer.remat.chain.MergeSkip`, so the memory planner sees every
  residual block, decoder block and the head as stages passing the skip tensors
  along (:mod:`waggle_trainer.remat.chain`).
* **classify**: the torchvision ResNet itself with a ``C``-way linear ``fc``.

Weights are never downloaded (``weights=None``); a student is saved to and loaded
from safetensors files that carry what it is in their metadata (architecture, task,
classes, input size, head stride), checked on load.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from waggle_trainer.common import Arch
from waggle_trainer.learn.task import Task
from waggle_trainer.remat.chain import KeepInput, MergeSkip, build_resnet
from waggle_trainer.vision.preprocess import IMAGENET_MEAN, IMAGENET_STD

#: ``-2``: the U-Net decoder (``-1`` files, a decoder without skips, are refused).
FORMAT = "waggle-student-2"
OLD_FORMATS = ("waggle-student-1",)
#: Heat-map logits start at the prior probability 0.1 of a centre (CenterNet's init).
HEAT_PRIOR = 0.1


class StudentError(ValueError):
    """A student weights file that cannot be used: one line naming the file."""


@dataclass(frozen=True)
class StudentSpec:
    """What a student is; saved in its weights file's metadata."""

    arch: Arch
    task: Task
    input_width: int
    input_height: int
    head_stride: int = 4
    trunk_stride: int = 16

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "arch": self.arch,
            "kind": self.task.kind,
            "classes": json.dumps(list(self.task.classes)),
            "input_width": str(self.input_width),
            "input_height": str(self.input_height),
            "head_stride": str(self.head_stride),
            "trunk_stride": str(self.trunk_stride),
        }

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the detection head's output grid."""
        return self.input_height // self.head_stride, self.input_width // self.head_stride


def spec_from_config(cfg, task: Task) -> StudentSpec:
    s = cfg.student
    return StudentSpec(s.arch, task, s.input_width, s.input_height, s.head_stride, s.trunk_stride)


class UpBlock(nn.Module):
    """``relu(up2(bn(conv3x3(x))) + bn(conv1x1(skip)))``: the coarse map, convolved
    and up-sampled 2x (bilinear), plus the trunk's map of the finer resolution."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.lateral = nn.Conv2d(skip_channels, out_channels, 1, bias=False)
        self.lateral_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.bn(self.conv(x)), size=skip.shape[-2:], mode="bilinear")
        return F.relu(up + self.lateral_bn(self.lateral(skip)))


class CenterHead(nn.Module):
    """Per-class centre heat-map logits and (w, h, dx, dy) regression, concatenated."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        last = nn.Conv2d(hidden, num_classes, 1)
        with torch.no_grad():
            last.bias.fill_(-math.log((1 - HEAT_PRIOR) / HEAT_PRIOR))  # type: ignore[union-attr]
        self.heat = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(),
            last,
        )
        self.box = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, 4, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.heat(x), self.box(x)], dim=1)


def _channels(layer: nn.Module) -> int:
    """Output channels of a ResNet stage (its last block's last BatchNorm)."""
    bns = [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)]
    return int(bns[-1].num_features)


def build_student(spec: StudentSpec) -> nn.Module:
    """A freshly initialised student for ``spec`` (training mode)."""
    return _build(spec).train()


def _build(spec: StudentSpec) -> nn.Module:
    if spec.task.kind == "classify":
        return build_resnet(spec.arch, spec.task.num_classes)
    if spec.head_stride not in (4, 8) or spec.trunk_stride not in (16, 32):
        raise ValueError(
            f"head stride {spec.head_stride} / trunk stride {spec.trunk_stride} "
            "is not 4 or 8 / 16 or 32"
        )
    resnet = build_resnet(spec.arch, 1)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    if spec.trunk_stride == 16:
        names.pop()
    ups = int(math.log2(spec.trunk_stride // spec.head_stride))
    layers = names[4:]
    # the inputs of the last ``ups`` layers are the decoder's skips (finest first)
    skip_layers = layers[-ups:]
    skip_channels = [_channels(resnet.get_submodule(_before(n))) for n in skip_layers]
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    for n in names:
        module = getattr(resnet, n)
        parts[n] = KeepInput(module) if n in skip_layers else module
    channels = _channels(getattr(resnet, names[-1]))
    widths = (256, 128, 64)[-ups:]
    for i, (width, skip) in enumerate(zip(widths, reversed(skip_channels), strict=True), 1):
        parts[f"up{i}"] = MergeSkip(UpBlock(channels, skip, width))
        channels = width
    parts["head"] = CenterHead(channels, spec.task.num_classes)
    return nn.Sequential(parts)


def _before(layer: str) -> str:
    """The module whose output is ``layer``'s input (``layer1``'s: the stem's ``bn1``)."""
    return "bn1" if layer == "layer1" else f"layer{int(layer[-1]) - 1}"


# ------------------------------------------------------------------- images in


def to_input(image: np.ndarray, width: int, height: int) -> torch.Tensor:
    """An RGB uint8 HxWx3 frame resized to the student's input: uint8 [3, h, w]."""
    if image.shape[1] != width or image.shape[0] != height:
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, h, w] -> float32, ImageNet mean and standard deviation."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean) / std


# -------------------------------------------------------------------- weights


def save_student(model: nn.Module, spec: StudentSpec, path: str | Path) -> None:
    """Write the student's weights and what it is (metadata) as safetensors."""
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=spec.metadata())


def read_student_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; StudentError when unreadable."""
    p = Path(path)
    if not p.is_file():
        raise StudentError(f"{p}: student weights file not found")
    try:
        tensors = load_file(str(p))
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StudentError(f"{p}: not a safetensors file ({first})") from None
    return tensors, meta


def check_metadata(meta: dict[str, str], spec: StudentSpec, source: str) -> None:
    """Refuse a file made for another student (when it says what it is)."""
    if meta.get("format") in OLD_FORMATS:
        raise StudentError(
            f"{source}: a student of the format {meta['format']} (a decoder without skip "
            f"connections), this version needs {FORMAT}: train a new one"
        )
    if meta.get("format") != FORMAT:
        return
    want = spec.metadata()
    for key in ("arch", "kind", "classes", "head_stride", "trunk_stride"):
        if meta.get(key) != want[key]:
            raise StudentError(
                f"{source}: a student with {key} {meta.get(key)} (the config asks for {want[key]})"
            )


def apply_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load ``tensors`` into ``model``: every key present, every shape equal."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        more = len(missing) + len(unexpected) - 1
        raise StudentError(
            f"{source}: does not fit this student ({what}"
            + (f" and {more} more keys" if more else "")
            + ")"
        )
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise StudentError(
                f"{source}: {key} has shape {list(value.shape)}, the student needs "
                f"{list(own[key].shape)}"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise StudentError(f"{source}: {key} holds non-finite values")
    model.load_state_dict(tensors)


def load_student(path: str | Path, spec: StudentSpec) -> nn.Module:
    """A student for ``spec`` with the weights of ``path``."""
    tensors, meta = read_student_file(path)
    check_metadata(meta, spec, str(path))
    model = build_student(spec)
    apply_weights(model, tensors, str(path))
    return model


# ----------------------------------------------------------------- BatchNorm


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches) -> int:
    """Precise BatchNorm statistics: every BatchNorm's running mean and variance
    recomputed as the plain average over ``batches`` (normalised input tensors, or
    tuples whose first element is one) with the current weights; returns the number
    of samples seen.  Running statistics kept by momentum lag the weights of a
    student that trains a few steps at a time on batches of 2-12 (measured: the same
    weights scored 0.34-0.39 with them, where recomputed statistics scored 0.41 and
    learned faster early); the model's mode and momenta are restored.  With no batch
    the statistics stay as they were."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    batches = list(batches)
    if not bns or not batches:
        return 0
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in bns]  # type: ignore[union-attr]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += int(x.shape[0])
    except BaseException:
        for m, (momentum, mean, var) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.running_mean.copy_(mean)  # type: ignore[union-attr]
            m.running_var.copy_(var)  # type: ignore[union-attr]
        raise
    finally:
        model.train(was_training)
    for m, (momentum, _, _) in zip(bns, saved, strict=True):
        m.momentum = momentum
    return seen
