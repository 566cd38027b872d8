"""Turn a model into a chain of stages for checkpointing (rematerialization).

A *stage* is an ``nn.Module`` called with one argument; stage ``j`` maps ``a[j]`` to
``a[j+1]`` (see :mod:`waggle_trainer.remat.costs`).  Supported models:

* any ``nn.Sequential`` (with ``nn.Sequential.forward``): its children, nested plain
  Sequentials flattened recursively (also inside :class:`ApplyToFirst` and
  :class:`KeepInput`, see below);
* torchvision ``ResNet`` (resnet18/34/50/101/152, resnext, wide_resnet, with
  torchvision's own ``forward``): ``conv1, bn1, relu, maxpool``, each residual block
  of ``layer1 .. layer4``, ``avgpool``, ``flatten`` (``nn.Flatten(1)``, what
  ``ResNet._forward_impl`` does with ``torch.flatten(x, 1)``), ``fc``.

Stages are the model's own submodules (same parameters, buffers and ``training``
flag), so training the chain trains the model.  The model itself is not modified.

**Activations that are tuples.**  An activation is a tensor or a flat tuple of at
least two tensors (no lists, no nesting, no ``None``).  A stage receives it as its
single argument and returns one.  The convention of the wrappers below, which the
finer ResNet stages follow too, is a *stack*: element 0 is the main tensor, the
others are skip tensors waiting for a later stage, most recent first; a stage works
on a prefix and passes the rest through unchanged.  A result that would be a
1-tuple is the tensor itself.

* :class:`ApplyToFirst` ``(x, *rest) -> (inner(x), *rest)``;
* :class:`KeepInput` ``(x, *rest) -> (inner(x), x, *rest)``: ``x`` becomes a skip;
* :class:`MergeSkip` ``(x, skip, *rest) -> (inner(x, skip), *rest)``: consumes it.

Pitfalls.  A tensor passed on must be *the same tensor* (``return (y, skip)`` with
the ``skip`` received), not a copy or view: then it is one storage that the planners
count once (:mod:`.costs`); a copy would be counted and kept as a new activation.
Never modify a received tensor in place (the executor checks every tensor of the
input).  Floating tensors get gradients; others (masks, indices) are carried
without.  The chain's input and output may be tuples too: ``CheckpointedSequential``
then takes and returns the tuple, and the loss gets the tuple.  A wrapper is a
module level of its own: the wrapped module's state-dict keys gain ``inner.``
(``layer2.inner.0.conv1.weight``); wrap before loading weights, or rename the keys.

**Granularity** (:func:`named_stages`): ``"block"`` makes each torchvision
``BasicBlock``/``Bottleneck`` one stage; ``"conv"`` splits it at its convolutions,
with its own modules: ``KeepInput(conv1-bn1-relu)``, (Bottleneck)
``ApplyToFirst(conv2-bn2-relu)``, ``MergeSkip(conv-bn + downsample(identity), add,
relu)`` (:class:`ConvBnReLU`, :class:`ResidualJoin`): the same operations in the same
order as the block's ``forward``, so the results are bitwise equal, and checkpoints
inside a block are smaller than a block's output (a bottleneck's inner tensors have
a quarter of its channels), which lowers the smallest plan.  Blocks are split
wherever they appear as stages: in a ResNet, in a Sequential, inside
:class:`ApplyToFirst` (a block inside :class:`KeepInput` stays whole).

**In-place activations.**  A stage that overwrites its input breaks checkpointing:
the input may be a stored checkpoint that is read again, or part of the previous
stage's tape (``"modified by an inplace operation"``; torchvision's stem ReLU is
``inplace=True``).  Every *top-level* stage with a true ``inplace`` flag (ReLU,
ReLU6, LeakyReLU, Hardtanh, SiLU, Dropout, ...), and such a module directly inside
:class:`ApplyToFirst` or :class:`KeepInput`, is therefore wrapped in
:class:`OutOfPlace`, which runs the same module with ``inplace=False``: numerically
identical (same values, same RNG draws for dropout), one extra activation of memory,
which the profiler measures.  In-place ops *inside* a stage on its own
intermediates (e.g. ``out += identity; relu_(out)`` in a residual block) are fine;
a custom stage that writes into its input is detected by the executor and rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import torch
from torch import nn

from waggle_trainer.common import ARCHES, GRANULARITIES, Granularity

__all__ = [
    "Activation",
    "OutOfPlace",
    "ApplyToFirst",
    "KeepInput",
    "MergeSkip",
    "ConvBnReLU",
    "ResidualJoin",
    "named_stages",
    "chain_stages",
    "input_needs_grad",
    "tensors_of",
    "build_resnet",
    "RESNET_ARCHS",
]

#: What flows between stages: a tensor or a flat tuple of tensors.
Activation = Union[torch.Tensor, tuple[torch.Tensor, ...]]  # noqa: UP007 (a runtime alias)

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


def tensors_of(a: Activation, what: str = "an activation") -> tuple[torch.Tensor, ...]:
    """The tensors of an activation: ``(a,)`` for a tensor, ``a`` for a tuple.

    ``TypeError`` naming ``what`` for anything else (a list, a nested tuple, None).
    """
    if isinstance(a, torch.Tensor):
        return (a,)
    if isinstance(a, tuple) and a and all(isinstance(t, torch.Tensor) for t in a):
        return a
    got = type(a).__name__ if not isinstance(a, tuple) else "a tuple with non-tensors"
    raise TypeError(f"{what} must be a tensor or a flat, non-empty tuple of tensors, got {got}")


def _stack(first: Activation, rest: tuple[torch.Tensor, ...]) -> Activation:
    """``(*first, *rest)`` as an activation: a tensor when only one is left."""
    head = first if isinstance(first, tuple) else (first,)
    out = head + rest
    return out[0] if len(out) == 1 else out


def _split(a: Activation, k: int, who: str) -> tuple[tuple[torch.Tensor, ...], tuple]:
    tensors = tensors_of(a, f"the input of {who}")
    if len(tensors) < k:
        raise TypeError(f"{who} needs at least {k} tensors, got {len(tensors)}")
    return tensors[:k], tensors[k:]


class ApplyToFirst(nn.Module):
    """``(x, *rest) -> (inner(x), *rest)``: run ``inner`` on the first tensor and pass
    the others through unchanged; on a plain tensor, ``inner(x)``.

    A tuple returned by ``inner`` is spliced in: ``(*inner(x), *rest)``.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, a: Activation) -> Activation:
        (x,), rest = _split(a, 1, "ApplyToFirst")
        return _stack(self.inner(x), rest)


class KeepInput(nn.Module):
    """``(x, *rest) -> (inner(x), x, *rest)``: keep the first tensor as a skip tensor
    beside ``inner``'s output (``x -> (inner(x), x)`` on a plain tensor).

    ``x`` is passed on as the very tensor received, so it stays one storage.  A tuple
    returned by ``inner`` is spliced in, as by :class:`ApplyToFirst`.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, a: Activation) -> Activation:
        (x,), rest = _split(a, 1, "KeepInput")
        return _stack(self.inner(x), (x, *rest))


class MergeSkip(nn.Module):
    """``(x, skip, *rest) -> (inner(x, skip), *rest)``: consume the most recent skip
    tensor (the second one); ``inner`` takes two tensors (a tuple it returns is
    spliced in, as by :class:`ApplyToFirst`)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, a: Activation) -> Activation:
        (x, skip), rest = _split(a, 2, "MergeSkip")
        return _stack(self.inner(x, skip), rest)


class ConvBnReLU(nn.Module):
    """``relu(bn(conv(x)))`` with a residual block's own modules (the ReLU may be in
    place: it overwrites the BatchNorm's output, as the block does)."""

    def __init__(self, conv: nn.Module, bn: nn.Module, relu: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = conv, bn, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class ResidualJoin(nn.Module):
    """``relu(bn(conv(h)) + downsample(identity))``: the end of a torchvision residual
    block (``downsample`` None: the identity itself), with the block's own modules
    and its in-place add and ReLU on its own intermediate."""

    def __init__(
        self, conv: nn.Module, bn: nn.Module, downsample: nn.Module | None, relu: nn.Module
    ) -> None:
        super().__init__()
        self.conv, self.bn, self.downsample, self.relu = conv, bn, downsample, relu

    def forward(self, h: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(h))
        if self.downsample is not None:
            identity = self.downsample(identity)
        out += identity
        return self.relu(out)


def _block_parts(block: nn.Module, name: str) -> list[tuple[str, nn.Module]] | None:
    """A torchvision BasicBlock / Bottleneck (with its own ``forward``) split at its
    convolutions, or None for any other module."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    b: Any = block
    if type(block) is BasicBlock and type(block).forward is BasicBlock.forward:
        return [
            (f"{name}.conv1", KeepInput(ConvBnReLU(b.conv1, b.bn1, b.relu))),
            (f"{name}.conv2", MergeSkip(ResidualJoin(b.conv2, b.bn2, b.downsample, b.relu))),
        ]
    if type(block) is Bottleneck and type(block).forward is Bottleneck.forward:
        return [
            (f"{name}.conv1", KeepInput(ConvBnReLU(b.conv1, b.bn1, b.relu))),
            (f"{name}.conv2", ApplyToFirst(ConvBnReLU(b.conv2, b.bn2, b.relu))),
            (f"{name}.conv3", MergeSkip(ResidualJoin(b.conv3, b.bn3, b.downsample, b.relu))),
        ]
    return None


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


def _wrapper_of_sequential(module: nn.Module) -> bool:
    return type(module) in (ApplyToFirst, KeepInput) and _is_plain_sequential(
        module.inner  # type: ignore[arg-type]
    )


def _stage(name: str, module: nn.Module, granularity: Granularity) -> list[tuple[str, nn.Module]]:
    """One child as stages: split further when it is a container or (``"conv"``) a
    residual block, else itself."""
    if _is_plain_sequential(module) or _is_torchvision_resnet(module):
        return _raw_stages(module, name, granularity)
    if _wrapper_of_sequential(module):
        # ApplyToFirst(Sequential(c0, c1, ..)) = ApplyToFirst(c0), ApplyToFirst(c1), ..;
        # KeepInput(Sequential(c0, c1, ..)) = KeepInput(c0), ApplyToFirst(c1), ..
        children = list(module.inner.named_children())  # type: ignore[union-attr]
        out = []
        for i, (child_name, child) in enumerate(children):
            wrap = type(module) if i == 0 else ApplyToFirst
            out += _stage(f"{name}.inner.{child_name}", wrap(child), granularity)
        return out
    if granularity == "conv":
        inner = module.inner if type(module) is ApplyToFirst else module
        parts = _block_parts(inner, name)
        if parts is not None:  # the parts pass any further tensors through themselves
            return parts
    return [(name, module)]


def _raw_stages(
    module: nn.Module, prefix: str, granularity: Granularity
) -> list[tuple[str, nn.Module]]:
    join = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    if _is_torchvision_resnet(module):
        out = [(join(n), getattr(module, n)) for n in ("conv1", "bn1", "relu", "maxpool")]
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            for i, block in enumerate(getattr(module, layer)):
                out += _stage(join(f"{layer}.{i}"), block, granularity)
        out += [
            (join("avgpool"), module.avgpool),
            (join("flatten"), nn.Flatten(1)),
            (join("fc"), module.fc),
        ]
        return out
    if _is_plain_sequential(module):
        out = []
        for name, child in module.named_children():
            out += _stage(join(name), child, granularity)
        return out
    raise TypeError(
        f"cannot split {type(module).__name__} into a chain of stages: expected an nn.Sequential "
        "or a torchvision ResNet (wrap other models' parts in an nn.Sequential)"
    )


def _out_of_place(stage: nn.Module) -> nn.Module:
    if _is_inplace(stage):
        return OutOfPlace(stage)
    if type(stage) in (ApplyToFirst, KeepInput) and _is_inplace(stage.inner):  # type: ignore[arg-type]
        return type(stage)(OutOfPlace(stage.inner))  # type: ignore[arg-type]
    return stage


def named_stages(
    module: nn.Module, granularity: Granularity = "block"
) -> list[tuple[str, nn.Module]]:
    """``[(name, stage), ...]`` for ``module``; names are dotted submodule paths
    (a residual block's parts: ``layer1.0.conv1`` .. ``conv3``).

    ``nn.Sequential(*[stage for _, stage in named_stages(m)])(x)`` equals ``m(x)``
    exactly (for a ResNet: up to ``torch.flatten`` being an ``nn.Flatten(1)``).
    ``granularity``: ``"block"`` or ``"conv"`` (see the module doc).  Top-level
    in-place stages are wrapped in :class:`OutOfPlace`.  Raises ``TypeError`` for a
    model that is neither a Sequential nor a torchvision ResNet.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}"
        )
    stages = _raw_stages(module, "", granularity)
    if not stages:
        raise ValueError("the module has no stages (empty nn.Sequential)")
    return [(name, _out_of_place(stage)) for name, stage in stages]


def input_needs_grad(stages: Sequence[nn.Module], input_requires_grad: bool) -> list[bool]:
    """For each stage, whether its input needs a gradient: the chain's input does, or
    an earlier stage has a trainable parameter."""
    out = [input_requires_grad]
    for stage in list(stages)[:-1]:
        out.append(out[-1] or any(p.requires_grad for p in stage.parameters()))
    return out


def chain_stages(module: nn.Module, granularity: Granularity = "block") -> list[nn.Module]:
    """The stages of :func:`named_stages` without names."""
    return [stage for _, stage in named_stages(module, granularity)]


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
