"""Predicted and measured memory of a plain training step; the memory subcommand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from waggle_trainer.cli import main  # noqa: E402
from waggle_trainer.remat import memory as M  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def _real_saved_bytes(arch: str, batch: int, image: int) -> int:
    """An independent count: a real CPU forward, saved storages deduplicated by data_ptr."""
    import torch.nn.functional as F
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None).train()
    x = torch.randn(batch, 3, image, image)
    skip = {p.data_ptr() for p in model.parameters()} | {x.data_ptr()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), torch.randint(0, 1000, (batch,)))
    return sum(seen.values())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_meta_activation_count_matches_a_real_forward(arch):
    pred = M.predict_step_memory(arch, 2, 96)
    assert pred.activation_bytes == _real_saved_bytes(arch, 2, 96)


def test_prediction_parts():
    p = M.predict_step_memory("resnet18", 4, 224, "adam")
    n_params = sum(
        t.numel() for t in __import__("torchvision").models.resnet18(weights=None).parameters()
    )
    assert p.parameter_bytes == p.gradient_bytes == n_params * 4
    assert p.optimizer_state_bytes == 2 * n_params * 4 and p.optimizer == "adam"
    assert p.input_bytes == 4 * 3 * 224 * 224 * 4
    assert p.workspace_bytes > 0
    assert p.total_bytes == (
        p.parameter_bytes
        + p.buffer_bytes
        + p.gradient_bytes
        + p.optimizer_state_bytes
        + p.input_bytes
        + p.activation_bytes
        + p.workspace_bytes
    )
    assert p.step_growth_bytes == p.total_bytes - p.parameter_bytes - p.buffer_bytes
    # activations are affine in the batch (BatchNorm's per-channel statistics are the constant)
    one = M.predict_step_memory("resnet18", 1, 224).activation_bytes
    two = M.predict_step_memory("resnet18", 2, 224).activation_bytes
    assert p.activation_bytes - two == 2 * (two - one)
    assert p.activation_bytes == pytest.approx(4 * one, rel=0.01)
    # ... and the bigger network needs more
    assert M.predict_step_memory("resnet50", 4, 224).activation_bytes > 2 * p.activation_bytes


def test_prediction_from_profiled_costs():
    from waggle_trainer.remat.costs import ChainCosts, StageCost

    costs = ChainCosts(
        input_bytes=100,
        stages=(
            StageCost("a", 0, 0, 0, output_bytes=200, saved_bytes=300, backward_peak_bytes=50),
            StageCost("b", 0, 0, 0, output_bytes=10, saved_bytes=20, forward_peak_bytes=1000),
        ),
    )
    p = M.predict_step_memory("resnet18", 1, 64, costs=costs)
    assert p.activation_bytes == 320
    assert p.workspace_bytes == 1000  # max(50 + 100 + 200, 1000)
    assert p.source.startswith("profiled")


@pytest.mark.parametrize(
    "args, match",
    [
        (("resnet19", 1, 224), "unknown architecture 'resnet19'.*resnet18"),
        (("resnet18", 0, 224), "batch must be an integer >= 1, got 0"),
        (("resnet18", 1, 16), "image must be an integer from 32 to 2048 pixels, got 16"),
        (("resnet18", 1, 32), "batch 1 is too small for image 32 .*BatchNorm"),
        (("resnet18", 1, 224, "lbfgs"), "unknown optimizer 'lbfgs'"),
    ],
)
def test_bad_shapes_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        M.predict_step_memory(*args)


def test_reference_table_is_the_studys():
    assert M.REFERENCE_MB[1][0] == 230.05 and M.REFERENCE_MB[50][4] == 25776.48
    assert M.REFERENCE_IMAGE_MB[1500] == (2628.70, 10944.42)
    row = {
        "arch": "resnet18",
        "batch": 1,
        "image": 224,
        "reference_mb": 200.0,
        "predicted": {
            "total_bytes": 100 * MiB,
            "step_growth_bytes": 50 * MiB,
            "activation_bytes": 20 * MiB,
        },
        "measured": {"rss_growth_bytes": 55 * MiB, "tensor_peak_bytes": 45 * MiB},
    }
    lines = M.format_rows([row])
    assert lines[-1] == "| resnet18 | 1 | 224 | 200.00 | 100 | 0.50 | 20 | 50 | 55 | 45 | 1.10 |"


def test_cli_prints_the_breakdown_and_json(capsys):
    assert main(["memory", "--arch", "resnet18", "--batch", "2", "--image", "128"]) == 0
    out = capsys.readouterr().out
    for word in ("parameters", "gradients", "optimiser state", "activations", "workspace", "total"):
        assert word in out
    assert main(["memory", "--arch", "resnet34", "--batch", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["measured"] is None
    p = data["predicted"]
    assert p["arch"] == "resnet34" and p["total_bytes"] > p["activation_bytes"] > 0


@pytest.mark.parametrize(
    "argv, word",
    [
        (["--arch", "vgg16"], "vgg16"),
        (["--batch", "two"], "'two'"),
        (["--batch", "-3"], "-3"),
        (["--image", "5000"], "5000"),
        (["--optimizer", "rmsprop"], "rmsprop"),
        (["--table", "--measure-limit", "lots"], "lots"),
    ],
)
def test_cli_bad_arguments_one_line_exit_2(argv, word):
    r = subprocess.run(
        [sys.executable, "-m", "waggle_trainer", "memory", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert word in lines[0] and "error" in lines[0]


@pytest.mark.slow
def test_measure_a_real_step_in_a_fresh_process():
    pred = M.predict_step_memory("resnet18", 2, 128)
    m = M.measure_step_memory("resnet18", 2, 128)
    assert m.baseline_rss_bytes > 50 * MiB
    assert m.peak_rss_bytes > m.baseline_rss_bytes
    assert m.step_s > 0
    # the tensor-level peak holds at least the activations and the momentum buffers
    assert m.tensor_peak_bytes >= pred.activation_bytes + pred.optimizer_state_bytes
    assert 0.5 * pred.step_growth_bytes < m.rss_growth_bytes < 2.5 * pred.step_growth_bytes
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "waggle_trainer",
            "memory",
            "--arch",
            "resnet18",
            "--batch",
            "1",
            "--image",
            "64",
            "--measure",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["measured"]["rss_growth_bytes"] > 0
    assert data["measured"]["tensor_peak_bytes"] > 0
