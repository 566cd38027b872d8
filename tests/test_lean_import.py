"""TorchDynamo and sympy stay out of a training process until something compiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_TRAIN = r"""
import json, sys
from waggle_trainer import lean_import
lean_import.install()  # what the command line does first
import torch, torchvision
torch.set_num_threads(1)
model = torchvision.models.resnet18(num_classes=4)
out = {}
for name, opt in (("sgd", torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)),
                  ("adamw", torch.optim.AdamW(model.parameters()))):
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    opt.zero_grad()
    opt.load_state_dict(opt.state_dict())
out["trained_without_dynamo"] = lean_import.stand_in_active()
# the executor's backward of a stage: an explicit gradient (torch.autograd.backward
# checks its shape with symbolic_shapes.sym_eq/expect_true)
w = torch.randn(3, 4, requires_grad=True)
torch.autograd.backward(w * 2, torch.full((3, 4), 0.5))
out["grad"] = w.grad.tolist()
try:
    torch.autograd.backward(w * 2, torch.ones(4, 3))
except RuntimeError as exc:
    out["mismatch"] = str(exc)
out["backward_without_sympy"] = "sympy" not in sys.modules and lean_import.shapes_stand_in_active()
from torchvision.ops import roi_align
roi_align(torch.randn(1, 1, 8, 8), torch.tensor([[0, 0.0, 0, 4, 4]]), 2)
out["roi_align_without_dynamo"] = lean_import.stand_in_active()
if sys.argv[1] == "compile":
    import torch._dynamo.config  # a submodule: the real package loads
    out["real_after_submodule_import"] = not lean_import.stand_in_active()
    out["compiled"] = torch.compile(lambda x: x * 2, backend="eager")(torch.ones(2)).tolist()
    out["dynamo_file"] = torch._dynamo.__file__
    import torch.fx.experimental.symbolic_shapes as shapes
    out["real_shapes"] = hasattr(shapes, "ShapeEnv") and not lean_import.shapes_stand_in_active()
print(json.dumps(out))
"""


def _run(*args: str, **env: str) -> dict:
    p = subprocess.run(
        [sys.executable, "-c", _TRAIN, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, **env},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_training_and_torchvision_do_not_load_dynamo_and_compile_still_works():
    out = _run("compile")
    assert out["trained_without_dynamo"] and out["roi_align_without_dynamo"]
    assert out["real_after_submodule_import"]
    assert out["compiled"] == [2.0, 2.0]
    assert out["dynamo_file"].endswith(os.path.join("torch", "_dynamo", "__init__.py"))
    assert out["real_shapes"]


def test_backward_with_a_gradient_does_not_load_sympy_and_still_checks_shapes():
    lean = _run("train")
    full = _run("train", WAGGLE_FULL_IMPORT="1")
    assert lean["backward_without_sympy"] and not full["backward_without_sympy"]
    assert lean["grad"] == full["grad"] == [[1.0] * 4] * 3
    assert "Mismatch in shape" in lean["mismatch"] and lean["mismatch"] == full["mismatch"]


def test_full_import_on_request():
    out = _run("train", WAGGLE_FULL_IMPORT="1")
    assert not out["trained_without_dynamo"]


def test_importing_the_package_leaves_torch_as_it_ships():
    """A library user (``from waggle_trainer.remat import CheckpointedSequential``)
    gets the ordinary torch: only the command line installs the stand-in."""
    code = (
        "import waggle_trainer.remat, torch, torch.optim; from waggle_trainer import lean_import;"
        "print(lean_import.stand_in_active())"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "False"
