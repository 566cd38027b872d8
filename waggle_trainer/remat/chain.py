"""Turn a model into a chain of stages for checkpointing (rematerialization).

A *stage* is an ``nn.Module`` mapping one tensor to one tensor; stage ``j`` maps
``a[j]`` to ``a[j+1]`` (see :mod:`waggle_trainer.remat.costs`).  Supported models:

* any ``nn.Sequential`` (with ``nn.Sequential.forward``): its children, nested plain
  Sequentials flattened recursively;
* torchvision ``ResNet`` (resnet18/34/50/101/152, resnext, wide_resnet, with
  torchvision's own ``forward``): ``conv1, bn1, relu, maxpool``, each residual block
  of ``layer1 .. layer4``, ``avgpool``, ``flatten`` (``nn.Flatten(1)``, what
  ``ResNet._forward_impl`` does with ``torch.flatten(x, 1)``), ``fc``.

Stages are the model's own submodules (same parameters, buffers and ``training``
flag), so training the chain trains the model.  The model itself is not modified.

**In-place activations.**  A stage that overwrites its input breaks checkpointing:
the input may be a stored checkpoint that is read again, or part of the previous
stage's tape (``"modified by an inplace operation"``; torchvision's stem ReLU is
``inplace=True``).  Every *top-level* stage with a true ``inplace`` flag (ReLU,
ReLU6, LeakyReLU, Hardtanh, SiLU, Dropout, ...) is therefore wrapped in
:class:`OutOfPlace`, which runs the same module with ``inplace=False``: numerically
identical (same values, same RNG draws for dropout), one extra activation of memory,
which the profiler measures.  In-place ops *inside* a stage on its own
intermediates (e.g. ``out += identity; relu_(out)`` in a residual block) are fine;
a custom stage that writes into its input is detected by the executor and rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from waggle_trainer.common import ARCHES

__all__ = [
    "OutOfPlace",
    "named_stages",
    "chain_stages",
    "input_needs_grad",
    "build_resnet",
    "RESNET_ARCHS",
]

#: What :func:`build_resnet` builds: the student/teacher architectures of the config
#: (:data:`waggle_trainer.common.ARCHES`) and the rest of torchvision's ResNet family.
RESNET_ARCHS: tuple[str, ...] = ARCHES + (
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)


class OutOfPlace(nn.Module):
    """Run ``inner`` (a module with an ``inplace`` flag) out of place.

    ``inner`` stays the model's own module (its ``training`` flag follows
    ``model.train()/eval()``); only for the duration of the call its ``inplace``
    attribute is set to ``False``.  Not meant to be shared across threads that call
    the original module concurrently.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner: Any = self.inner
        previous = inner.inplace
        inner.inplace = False
        try:
            return inner(x)
        finally:
            inner.inplace = previous


def _is_inplace(module: nn.Module) -> bool:
    flag = getattr(module, "inplace", None)
    return isinstance(flag, bool) and flag


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _is_torchvision_resnet(module: nn.Module) -> bool:
    try:
        from torchvision.models.resnet import ResNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return False
    return (
        isinstance(module, ResNet)
        and type(module).forward is ResNet.forward
        and type(module)._forward_impl is ResNet._forward_impl
    )


def _raw_stages(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    join = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    if _is_torchvision_resnet(module):
        out = [(join(n), getattr(module, n)) for n in ("conv1", "bn1", "relu", "maxpool")]
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            for i, block in enumerate(getattr(module, layer)):
                out.append((join(f"{layer}.{i}"), block))
        out += [
            (join("avgpool"), module.avgpool),
            (join("flatten"), nn.Flatten(1)),
            (join("fc"), module.fc),
        ]
        return out
    if _is_plain_sequential(module):
        out = []
        for name, child in module.named_children():
            if _is_plain_sequential(child) or _is_torchvision_resnet(child):
                out += _raw_stages(child, join(name))
            else:
                out.append((join(name), child))
        return out
    raise TypeError(
        f"cannot split {type(module).__name__} into a chain of stages: expected an nn.Sequential "
        "or a torchvision ResNet (wrap other models' parts in an nn.Sequential)"
    )


def named_stages(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, stage), ...]`` for ``module``; names are dotted submodule paths.

    ``nn.Sequential(*[stage for _, stage in named_stages(m)])(x)`` equals ``m(x)``
    exactly (for a ResNet: up to ``torch.flatten`` being an ``nn.Flatten(1)``).
    Top-level in-place stages are wrapped in :class:`OutOfPlace`.  Raises
    ``TypeError`` for a model that is neither a Sequential nor a torchvision ResNet.
    """
    stages = _raw_stages(module, "")
    if not stages:
        raise ValueError("the module has no stages (empty nn.Sequential)")
    return [(name, OutOfPlace(stage) if _is_inplace(stage) else stage) for name, stage in stages]


def input_needs_grad(stages: Sequence[nn.Module], input_requires_grad: bool) -> list[bool]:
    """For each stage, whether its input needs a gradient: the chain's input does, or
    an earlier stage has a trainable parameter."""
    out = [input_requires_grad]
    for stage in list(stages)[:-1]:
        out.append(out[-1] or any(p.requires_grad for p in stage.parameters()))
    return out


def chain_stages(module: nn.Module) -> list[nn.Module]:
    """The stages of :func:`named_stages` without names."""
    return [stage for _, stage in named_stages(module)]


def build_resnet(arch: str, num_classes: int = 1000) -> nn.Module:
    """A freshly initialised torchvision ResNet (``weights=None``: never downloads).

    ``arch`` is one of :data:`RESNET_ARCHS`, e.g. ``"resnet18"``.
    """
    if arch not in RESNET_ARCHS:
        raise ValueError(
            f"unknown ResNet architecture {arch!r}; choose one of {', '.join(RESNET_ARCHS)}"
        )
    import torchvision.models as models

    return getattr(models, arch)(weights=None, num_classes=num_classes)
