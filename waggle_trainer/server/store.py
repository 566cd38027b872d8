"""Model store: every global model version as safetensors plus a JSON manifest.

Layout under ``<state dir>/models/<model>/``::

    v000001.safetensors        the weights (the whole state dict)
    v000001.momentum.safetensors  FedAvgM server momentum after this version (if any)
    v000001.json               the manifest; written last, it *is* the version

A version exists once its manifest exists: weights (and momentum) are written
atomically first, the manifest atomically after, so a crash leaves either a
complete version or none (stray weights without a manifest are removed and
rewritten identically by the next aggregation).  Retention keeps the weights
of the newest ``retain`` versions; older manifests stay as history, marked
``retired``.  Version names are the decimal sequence numbers ("1", "2", ...).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import file_sha256, remove_temp_files, save_tensors_atomic, write_atomic

if TYPE_CHECKING:  # torch is imported where weights are touched: listing stays light
    import torch

    from waggle_trainer.transport.codec import TensorSpec

_MANIFEST_RE = re.compile(r"^v(\d{6,})\.json$")


class StoreError(Exception):
    """A stored file is missing or not what its manifest says."""


@dataclass(frozen=True)
class VersionInfo:
    model: str
    seq: int
    manifest: dict[str, Any]
    weights: Path
    momentum: Path | None

    @property
    def version(self) -> str:
        return str(self.seq)

    @property
    def retired(self) -> bool:
        return not self.weights.exists()


def _name(seq: int) -> str:
    return f"v{seq:06d}"


class ModelStore:
    def __init__(self, root: Path, retain: int = 10, *, create: bool = True):
        self.root = Path(root)
        self.retain = retain
        if create:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._spec_cache: dict[tuple[str, int], dict[str, TensorSpec]] = {}

    # ------------------------------------------------------------------ reading
    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def seqs(self, model: str) -> list[int]:
        """Sequence numbers of the stored versions, oldest first (no manifest read)."""
        d = self.root / model
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for m in map(_MANIFEST_RE.match, os.listdir(d)) if m)

    def versions(self, model: str) -> list[VersionInfo]:
        return [self._info(model, seq) for seq in self.seqs(model)]

    def _info(self, model: str, seq: int) -> VersionInfo:
        d = self.root / model
        manifest = json.loads((d / f"{_name(seq)}.json").read_text())
        mom = d / f"{_name(seq)}.momentum.safetensors"
        return VersionInfo(
            model,
            seq,
            manifest,
            d / f"{_name(seq)}.safetensors",
            mom if manifest.get("momentum") else None,
        )

    def get(self, model: str, version: str) -> VersionInfo | None:
        if not version.isdigit() or int(version) < 1:
            return None
        seq = int(version)
        if not (self.root / model / f"{_name(seq)}.json").exists():
            return None
        return self._info(model, seq)

    def latest(self, model: str) -> VersionInfo | None:
        seqs = self.seqs(model)
        return self._info(model, seqs[-1]) if seqs else None

    def load_weights(self, info: VersionInfo) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if info.retired:
            raise StoreError(f"{info.model} version {info.version} is retired (weights removed)")
        if file_sha256(info.weights) != info.manifest["weights_sha256"]:
            raise StoreError(f"{info.weights}: content differs from its manifest")
        return load_file(str(info.weights))

    def load_momentum(self, info: VersionInfo) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        if info.momentum is None or not info.momentum.exists():
            return None
        return load_file(str(info.momentum))

    def spec(self, model: str, version: str) -> dict[str, TensorSpec] | None:
        """Names, shapes and dtypes of the floating tensors of a kept version
        (None when unknown or retired); read from the safetensors header only."""
        import torch
        from safetensors import safe_open

        from waggle_trainer.transport.codec import TensorSpec

        info = self.get(model, version)
        if info is None or info.retired:
            return None
        key = (model, info.seq)
        dtypes = {
            "F64": torch.float64,
            "F32": torch.float32,
            "F16": torch.float16,
            "BF16": torch.bfloat16,
        }
        if key not in self._spec_cache:
            spec = {}
            with safe_open(str(info.weights), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = dtypes.get(sl.get_dtype())
                    if dtype is not None:
                        spec[name] = TensorSpec(tuple(sl.get_shape()), dtype)
            self._spec_cache[key] = spec
        return self._spec_cache[key]

    # ------------------------------------------------------------------ writing
    def write(
        self,
        model: str,
        seq: int,
        weights: dict[str, torch.Tensor],
        manifest: dict[str, Any],
        momentum: dict[str, torch.Tensor] | None = None,
    ) -> VersionInfo:
        """Store version ``seq`` atomically (weights, momentum, then the manifest)."""
        d = self.root / model
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if (d / f"{_name(seq)}.json").exists():  # a version is written once, never replaced
            raise StoreError(f"{model} version {seq} exists already")
        wpath = d / f"{_name(seq)}.safetensors"
        save_tensors_atomic(
            wpath, weights, {"format": "waggle-model/1", "model": model, "version": str(seq)}
        )
        manifest = dict(
            manifest,
            model=model,
            version=str(seq),
            weights_sha256=file_sha256(wpath),
            weights_bytes=wpath.stat().st_size,
            momentum=momentum is not None,
        )
        if momentum is not None:
            save_tensors_atomic(d / f"{_name(seq)}.momentum.safetensors", momentum)
        write_atomic(
            d / f"{_name(seq)}.json",
            json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n",
        )
        self._apply_retention(model)
        return self._info(model, seq)

    def cleanup(self, model: str) -> None:
        """Remove interrupted writes: temp files and weights without a manifest."""
        d = self.root / model
        if not d.is_dir():
            return
        remove_temp_files(d)
        have = {p.name[:-5] for p in d.glob("v*.json")}
        for p in d.glob("v*.safetensors"):
            if p.name.split(".")[0] not in have:
                p.unlink(missing_ok=True)

    def _apply_retention(self, model: str) -> None:
        d = self.root / model
        for seq in self.seqs(model)[: -self.retain]:
            (d / f"{_name(seq)}.safetensors").unlink(missing_ok=True)
            (d / f"{_name(seq)}.momentum.safetensors").unlink(missing_ok=True)
            self._spec_cache.pop((model, seq), None)
