"""TorchDynamo stays out of a training process until something compiles."""

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
from torchvision.ops import roi_align
roi_align(torch.randn(1, 1, 8, 8), torch.tensor([[0, 0.0, 0, 4, 4]]), 2)
out["roi_align_without_dynamo"] = lean_import.stand_in_active()
if sys.argv[1] == "compile":
    import torch._dynamo.config  # a submodule: the real package loads
    out["real_after_submodule_import"] = not lean_import.stand_in_active()
    out["compiled"] = torch.compile(lambda x: x * 2, backend="eager")(torch.ones(2)).tolist()
    out["dynamo_file"] = torch._dynamo.__file__
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
