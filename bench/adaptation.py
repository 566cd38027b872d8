"""Viewpoint adaptation on real video, judged on human boxes (issue 16).

One run measures:

1. **Teacher reference.**  AP50 (person) of the teacher against the human boxes of
   the stream (vtest.avi frames 0-549, PETS09-S2L1 ground truth), its boxes at
   scores >= 0.05, for the single whole-frame look (``[teacher] tiles = 1``) and the
   tiled look (``tiles = 2``; reported "not available" when this checkout's config
   has no ``[teacher] tiles``); seconds per labelled frame for each.  Teacher outputs
   (boxes, never images) are cached by a hash of model + config + video.
2. **Factory student.**  ``AdaptationLoop`` from random initialisation on
   TUD-Campus + TUD-Stadtmitte (street level, every frame labelled by the teacher),
   cached by a hash of its config; its AP50 against the TUD human boxes (the frames
   it trained on: trained on their teacher labels, judged on human boxes).
3. **Arms.**  ``adapted`` = the factory student adapted on the stream, ``scratch`` =
   random initialisation adapted the same way; the project's default config with
   only the seed, the starting weights and a memory budget that forces
   checkpointing (smallest feasible + 0.35 x (plain - smallest)); ``--set
   SECTION.KEY=VALUE`` overrides any key.  Frames are fed one by one with
   ``loop.feed``; every ``--curve-every`` rounds and after the last the student the
   node keeps is judged on every ``--curve-stride``-th stream frame against human
   boxes (the wall clock paused meanwhile).
4. **Finals** per seed and arm: AP50 against the human boxes on all stream frames;
   AP50 against the tiled teacher's labels (score >= its default threshold) on
   frames 551-794 (never trained on); teacher calls per frame, rounds, wall time,
   plan and peak; Spearman correlation of held-out agreement with human AP.
5. **Targets**, PASS / MISSED / not measured.

Writes ``adaptation.md``, ``adaptation.json`` and ``adaptation.png`` into ``--out``
(a ``--quick`` or ``--frames`` run writes ``adaptation-quick.*`` /
``adaptation-partial.*`` when ``--out`` is the default, so the committed table stays).

    .venv/bin/python bench/adaptation.py [--seeds 0 1 2] [--arms adapted scratch]
    .venv/bin/python bench/adaptation.py --quick --seeds 0 --out /tmp/adapt-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _under_the_nodes_allocator() -> None:
    """Re-execute under the allocator a node trains under (``[memory] allocator``'s
    default, as ``waggle-trainer adapt`` and ``run`` do), before torch is imported:
    under glibc a recomputing plan maps and unmaps every large activation (about 2x
    the step time measured here)."""
    from waggle_trainer.remat.allocator import DEFAULT_ALLOCATOR, plan_preload

    plan = plan_preload(DEFAULT_ALLOCATOR)
    if plan.note:
        print(f"adaptation bench: {plan.note}", file=sys.stderr)
    if plan.env is not None:
        sys.stdout.flush()
        os.execve(
            sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], plan.env
        )


if __name__ == "__main__":
    _under_the_nodes_allocator()

import torch  # noqa: E402

from waggle_trainer.common import cpu_model, format_size  # noqa: E402
from waggle_trainer.config import ConfigError, config_from_dict  # noqa: E402
from waggle_trainer.learn.adaptation import AdaptationLoop, predict_frames  # noqa: E402
from waggle_trainer.learn.agreement import average_precision  # noqa: E402
from waggle_trainer.learn.model_refs import ModelRefError, is_ref, resolve_ref  # noqa: E402
from waggle_trainer.learn.student import (  # noqa: E402
    StudentError,
    load_student,
    save_student,
    spec_from_config,
)
from waggle_trainer.learn.task import Task  # noqa: E402
from waggle_trainer.learn.teachers import Detections, TeacherError, load_teacher  # noqa: E402
from waggle_trainer.remat.allocator import loaded_allocator  # noqa: E402
from waggle_trainer.remat.planner import Planner  # noqa: E402
from waggle_trainer.vision.frames import SourceError, open_source  # noqa: E402

PROG = "bench/adaptation.py"
STREAM_FRAMES = 550  # vtest frames 0-549: the stream, with human boxes
EVAL_RANGE = (551, 795)  # vtest frames 551-794: never trained on, judged against the teacher
EVAL_SCORE = 0.05  # scores down to this count towards AP (the whole P/R curve)
MAX_DETECTIONS = 100
BATCH = 8
FACTORY_SEED = 1000
BUDGET_FRACTION = 0.35  # budget = smallest + 0.35 x (plain - smallest)
TARGET_GAIN = 0.10  # adapted - teacher (single look), AP50 on the stream
TARGET_STRETCH = 0.85  # adapted AP50 on the stream
TARGET_WALL_S = 600.0
TARGET_CALLS = 0.5
TEACHER_REFERENCE = 0.644  # the single look's AP50 as measured before (for the text only)

FILES = {
    "vtest": "vtest.avi",
    "stream_gt": "PETS09-S2L1-stream.gt.txt",
    "tud_campus": "TUD-Campus.mp4",
    "tud_campus_gt": "TUD-Campus.gt.txt",
    "tud_stadtmitte": "TUD-Stadtmitte.mp4",
    "tud_stadtmitte_gt": "TUD-Stadtmitte.gt.txt",
}
TUD = (("tud_campus", "tud_campus_gt"), ("tud_stadtmitte", "tud_stadtmitte_gt"))

#: --quick: a smoke run of a minute or two, labelled QUICK everywhere.
QUICK: dict[str, Any] = {
    "frames": 60,
    "factory_frames_per_video": 20,
    "eval_frames": 20,
    "curve_stride": 10,
    "curve_every": 1,
    "set": {"training": {"steps_per_round": 4}, "adaptation": {"new_samples_per_round": 8}},
}


class BenchError(Exception):
    """A problem the run cannot go on with: one line, exit code 2."""


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {msg}", file=sys.stderr, flush=True)


STARTED = time.perf_counter()


# ------------------------------------------------------------------------ config


def merge(*layers: dict) -> dict:
    """Deep merge of config dicts, later layers winning."""
    out: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = json.loads(json.dumps(value)) if isinstance(value, dict) else value
    return out


def make_config(*layers: dict):
    data = merge(*layers)
    try:
        return config_from_dict(data, "bench config")
    except ConfigError as exc:
        raise BenchError("; ".join(exc.lines())) from None


def parse_set(items: list[str]) -> dict:
    """``--set SECTION.KEY=VALUE`` (value a TOML literal; a bare word is a string)."""
    data: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise BenchError(f"--set {item!r}: give SECTION.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            if not re.fullmatch(r"[A-Za-z_][\w.:/+-]*", raw.strip()):
                raise BenchError(
                    f"--set {item!r}: {raw!r} is not a TOML value (quote strings)"
                ) from None
            value = raw.strip()
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise BenchError(f"--set {item!r}: {p} is set to a value already")
        node[parts[-1]] = value
    return data


def effective(cfg) -> dict:
    """The config as JSON (secrets masked), for the results."""
    return cfg.model_dump(mode="json")


def tiles_support(overrides: dict) -> str:
    """Empty when ``[teacher] tiles`` is accepted here, else why not (one line)."""
    try:
        config_from_dict(merge(overrides, {"teacher": {"tiles": 2}}), "bench config")
    except ConfigError as exc:
        mine = [
            f"{loc}: {msg.split(' (allowed:')[0]}"  # the list of keys is noise here
            for loc, msg in exc.problems
            if loc.startswith("teacher.tiles")
        ]
        if mine:
            return mine[0]
        raise BenchError("; ".join(exc.lines())) from None
    return ""


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


# -------------------------------------------------------------------------- data


def find_data(data: Path) -> dict[str, Path]:
    files = {}
    for name, file in FILES.items():
        p = data / file
        if not p.is_file():
            raise BenchError(f"--data {data}: {p} not found (the folder must hold {file})")
        files[name] = p
    return files


def read_gt(path: Path, person: int, stop: int | None = None) -> dict[int, Detections]:
    """Human boxes of a MOTChallenge ground-truth file (``frame,id,left,top,width,height,
    conf,...``, frames 1-based) as Detections of class ``person`` per 0-based frame,
    every frame up to the file's last (or ``stop``) present, empty or not.

    Every row counts, also those with conf 0 (174 of the stream's 2,993: small people
    far up the path): the data README counts them among the human boxes and the
    teacher's reference AP50 (0.644) was measured with them (0.638 without)."""
    rows: dict[int, list] = {}
    last = 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(",")
        try:
            frame = int(float(parts[0]))
            left, top, w, h = (float(v) for v in parts[2:6])
        except (ValueError, IndexError):
            raise BenchError(f"{path}: line {n} is not MOTChallenge ground truth") from None
        last = max(last, frame)
        rows.setdefault(frame - 1, []).append((left, top, left + w, top + h))
    n_frames = last if stop is None else min(last, stop)
    return {i: human_boxes(rows.get(i, []), person) for i in range(n_frames)}


def human_boxes(boxes: list, person: int) -> Detections:
    n = len(boxes)
    return Detections(
        np.asarray(boxes, np.float32).reshape(n, 4),
        np.ones(n, np.float32),
        np.full(n, person, np.int64),
    )


def video_frames(path: Path, start: int = 0, stop: int | None = None, stride: int = 1) -> Iterator:
    """Frames ``start <= index < stop`` of a video (every ``stride``-th), read by the
    project's frame source: objects with ``.image`` (RGB uint8) and ``.index``."""
    frames = f"{start}:{stop if stop is not None else ''}"
    cfg = make_config({"camera": {"source": str(path), "fps": 0, "frames": frames}})
    try:
        source = open_source(cfg.camera)
    except SourceError as exc:
        raise BenchError(str(exc)) from None
    try:
        for f in source:
            if (f.index - start) % stride == 0:
                yield f
    except SourceError as exc:
        raise BenchError(str(exc)) from None
    finally:
        source.close()


# -------------------------------------------------------------------- evaluation


def predict_video(
    predict: Callable[[list], list], path: Path, start: int, stop: int | None, stride: int = 1
) -> dict[int, Any]:
    """``predict(images)`` over frames of ``path``, batch by batch: frame -> Detections."""
    out: dict[int, Any] = {}
    batch: list = []

    def flush() -> None:
        for f, d in zip(batch, predict([f.image for f in batch]), strict=True):
            out[f.index] = d
        batch.clear()

    for f in video_frames(path, start, stop, stride):
        batch.append(f)
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    return out


def student_predict(model, spec) -> Callable[[list], list]:
    return lambda images: predict_frames(model, spec, images, EVAL_SCORE, MAX_DETECTIONS)


def ap50(preds: dict, truths: dict, person: int) -> float | None:
    """Person AP50 over the frames both have (None: no truth box)."""
    keys = sorted(k for k in truths if k in preds)
    return average_precision([preds[k] for k in keys], [truths[k] for k in keys], person)


def student_ap(model, spec, path: Path, truths: dict, person: int, stride: int = 1):
    keys = sorted(truths)
    if not keys:
        return None
    preds = predict_video(student_predict(model, spec), path, keys[0], keys[-1] + 1, stride)
    return ap50(preds, truths, person)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None below 3 pairs or for
    a constant series."""
    if len(xs) < 3:
        return None

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    a, b = ranks(np.asarray(xs, float)), ranks(np.asarray(ys, float))
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


# ------------------------------------------------------------------ teacher cache


def teacher_identity(cfg) -> dict:
    """What the teacher's outputs depend on: its config, the task, its model files,
    the teacher code."""
    t = cfg.teacher
    if is_ref(t.model):
        try:
            _, model, config = resolve_ref(t.model)
        except ModelRefError as exc:
            raise BenchError(f"teacher.model: {exc}") from None
        files = [model, config]
    else:
        files = [Path(t.model).expanduser(), t.config]
    code = ROOT / "waggle_trainer" / "learn" / "teachers.py"
    return {
        "teacher": t.model_dump(mode="json"),
        "task": cfg.task.model_dump(mode="json"),
        "files": [file_key(p) for p in files if p is not None and Path(p).is_file()],
        "code": hashlib.sha256(code.read_bytes()).hexdigest() if code.is_file() else "",
    }


class TeacherOutputs:
    """A teacher's boxes on frames of videos, from the cache or computed (and cached)."""

    def __init__(self, cfg, cache_dir: Path, fresh: bool, what: str) -> None:
        self.cfg, self.cache_dir, self.fresh, self.what = cfg, cache_dir, fresh, what
        self.identity = teacher_identity(cfg)
        self._teacher: Any = None
        self.seconds_per_frame: float | None = None
        self.measured_at: str | None = None
        self.cached = True

    @property
    def teacher(self):
        if self._teacher is None:
            try:
                self._teacher = load_teacher(self.cfg)
            except TeacherError as exc:
                raise BenchError(str(exc)) from None
        return self._teacher

    def boxes(self, video: Path, start: int, stop: int | None) -> dict[int, Detections]:
        key = digest({**self.identity, "video": file_key(video), "frames": [start, stop]})
        path = self.cache_dir / f"teacher-{video.stem}-{start}-{stop}-{key}.json"
        if path.is_file() and not self.fresh:
            raw = json.loads(path.read_text())
            self.seconds_per_frame = raw["seconds_per_frame"]
            self.measured_at = raw["measured_at"]
            log(f"{self.what} on {video.name} {start}:{stop}: cached ({path.name})")
            return {
                int(k): Detections(
                    np.asarray(v["boxes"], np.float32).reshape(-1, 4),
                    np.asarray(v["scores"], np.float32),
                    np.asarray(v["classes"], np.int64),
                )
                for k, v in raw["frames"].items()
            }
        self.cached = False
        teacher = self.teacher
        out: dict[int, Detections] = {}
        spent = 0.0
        log(f"{self.what} on {video.name} {start}:{stop}: labelling")
        for f in video_frames(video, start, stop):
            t0 = time.perf_counter()
            out[f.index] = teacher.label([f.image])[0]
            spent += time.perf_counter() - t0
            if len(out) % 100 == 0:
                log(f"  {len(out)} frames, {spent / len(out):.3f} s a frame")
        self.seconds_per_frame = spent / max(1, len(out))
        self.measured_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "identity": self.identity,
                    "video": str(video),
                    "seconds_per_frame": self.seconds_per_frame,
                    "measured_at": self.measured_at,
                    "frames": {
                        str(k): {
                            "boxes": d.boxes.tolist(),
                            "scores": d.scores.tolist(),
                            "classes": d.classes.tolist(),
                        }
                        for k, d in out.items()
                    },
                }
            )
        )
        return out


class CachedTeacher:
    """The loop's teacher answering from labels computed before (factory training);
    anything else is the real teacher's."""

    def __init__(self, outputs: TeacherOutputs, labels: dict) -> None:
        self._outputs, self.labels = outputs, labels
        self.key: Any = None
        self.kind = outputs.cfg.task.kind
        self.classes = list(outputs.cfg.task.classes)

    def __getattr__(self, name: str):
        return getattr(self._outputs.teacher, name)

    def label(self, images):
        return [self.labels[self.key]]


def teacher_references(overrides: dict, args, files, person: int, cache_dir: Path) -> dict:
    """The teacher's AP50 against human boxes on the stream (scores >= 0.05), single
    and tiled look; plus the tiled teacher's labels of the evaluation frames."""
    why_no_tiles = tiles_support(overrides)
    truths = read_gt(files["stream_gt"], person, args.frames)
    refs: dict[str, Any] = {
        "tiles_not_available": why_no_tiles or None,
        "rows": {},
        "human_boxes": sum(len(d) for d in truths.values()),
    }
    for name, tiles in (("single", 1), ("tiled", 2)):
        if why_no_tiles and tiles > 1:
            refs["rows"][name] = {"tiles": tiles, "available": False, "why": why_no_tiles}
            log(f"teacher ({name} look): not available ({why_no_tiles})")
            continue
        teacher = {"score_threshold": EVAL_SCORE, "ignore_threshold": EVAL_SCORE} | (
            {} if why_no_tiles else {"tiles": tiles}
        )
        cfg = make_config(overrides, {"teacher": teacher})
        outputs = TeacherOutputs(cfg, cache_dir, args.fresh, f"teacher ({name} look)")
        preds = outputs.boxes(files["vtest"], 0, args.frames)
        ap = ap50(preds, truths, person)
        refs["rows"][name] = {
            "tiles": tiles,
            "available": True,
            "ap50_stream": ap,
            "seconds_per_frame": outputs.seconds_per_frame,
            "measured_at": outputs.measured_at,
            "cached": outputs.cached,
            "config": cfg.teacher.model_dump(mode="json"),
        }
        log(
            f"teacher ({name} look): AP50 person {fmt(ap)} on stream 0:{args.frames}, "
            f"{outputs.seconds_per_frame:.3f} s a labelled frame"
        )
    # labels of the evaluation frames: the tiled teacher at its default threshold
    look = "single" if why_no_tiles else "tiled"
    cfg = make_config(overrides, {} if why_no_tiles else {"teacher": {"tiles": 2}})
    outputs = TeacherOutputs(cfg, cache_dir, args.fresh, f"teacher ({look}, eval labels)")
    refs["eval_labels"] = outputs.boxes(files["vtest"], *args.eval_range)
    refs["eval_labeller"] = {
        "look": look,
        "score_threshold": cfg.teacher.score_threshold,
        "frames": list(args.eval_range),
    }
    return refs


# ---------------------------------------------------------------------- students


def factory_student(args, overrides: dict, files, person: int, cache_dir: Path, state_dir: Path):
    """The factory student (cached): trained from random init on the TUD videos, every
    frame labelled by the loop's teacher; with its AP50 against the TUD human boxes."""
    layers = [args.quick_set, overrides]
    forced = {
        # every frame labelled; rounds of 16 new samples: ~200 steps over the 250 frames
        "adaptation": {
            "teacher_stride_min": 1,
            "teacher_stride_max": 1,
            "new_samples_per_round": 16,
        },
        # street-level people are large: zoomed out too, the factory student also sees
        # people of the size a high camera shows
        "training": {"seed": FACTORY_SEED, "scale_range": [0.3, 1.0]},
        "student": {"weights": None},
    }
    cfg = make_config(*layers, forced)
    outputs = TeacherOutputs(cfg, cache_dir, args.fresh, "teacher (loop's, TUD labels)")
    stop = args.factory_frames_per_video
    labels = {
        (name, i): d for name, _ in TUD for i, d in outputs.boxes(files[name], 0, stop).items()
    }
    data = effective(cfg)
    recipe = {
        s: data[s] for s in ("task", "teacher", "student", "training", "adaptation", "memory")
    }
    key = digest(
        {
            "recipe": recipe,
            "videos": [file_key(files[n]) for n, _ in TUD],
            "frames_per_video": stop,
            "labels": outputs.identity,
        }
    )
    path = cache_dir / f"factory-{key}.safetensors"
    info_path = path.with_suffix(".json")
    spec = spec_from_config(cfg, Task(cfg.task.kind, tuple(cfg.task.classes)))
    if path.is_file() and info_path.is_file() and not args.fresh:
        info = json.loads(info_path.read_text())
        log(f"factory student: cached {path.name} ({info['rounds']} rounds)")
    else:
        cached = CachedTeacher(outputs, labels)
        loop = AdaptationLoop(cfg, cached, state_dir=state_dir)
        t0 = time.perf_counter()
        log(f"factory student: training on {' + '.join(files[n].name for n, _ in TUD)}")
        for name, _ in TUD:
            for f in video_frames(files[name], 0, stop):
                cached.key = (name, f.index)
                r = loop.feed(f)
                if r is not None:
                    log(f"  factory round {r.index}: {r.verdict}, loss {r.loss:.3f}")
        stats = loop.stats()
        save_student(loop.student, loop.spec, path)
        loop.close()
        info = {
            "rounds": stats["rounds"],
            "rounds_accepted": stats["rounds_accepted"],
            "rounds_rolled_back": stats["rounds_rolled_back"],
            "rounds_not_judged": stats["rounds_not_judged"],
            "frames": stats["frames_seen"],
            "train_s": time.perf_counter() - t0,
            "config": data,
        }
        info_path.write_text(json.dumps(info, indent=1))
        log(f"factory student: {info['rounds']} rounds in {info['train_s']:.0f} s -> {path.name}")
    model = load_student(path, spec)
    preds: dict = {}
    truths: dict = {}
    for name, gt in TUD:
        t = read_gt(files[gt], person, stop)
        p = predict_video(student_predict(model, spec), files[name], 0, stop)
        preds |= {(name, k): v for k, v in p.items()}
        truths |= {(name, k): v for k, v in t.items()}
    info["ap50_tud_human"] = ap50(preds, truths, person)
    info["path"] = str(path)
    log(f"factory student: AP50 person {fmt(info['ap50_tud_human'])} on the TUD frames (human)")
    return path, spec, model, info


def forced_budget(cfg, teacher, state_dir: Path) -> dict:
    """The activation budget between the smallest feasible plan and plain training's
    need (the project's planner on the profiled chain)."""
    probe = AdaptationLoop(cfg, teacher, state_dir=state_dir)
    try:
        # no public accessor: the loop's chain costs (the profile) via .training.chain
        costs = probe.training.chain.costs
        assert costs is not None  # profiled when the loop was built
        planner = Planner(costs)
        plain = planner.min_feasible_budget("none")
        lowest = planner.min_feasible_budget(cfg.memory.strategy)
        # what a step needs beyond the plan's tensors, as this machine measured it (the
        # loop subtracts it from the budget before planning)
        overhead = int(probe.training.overshoot_bytes)
    finally:
        probe.close()
    activations = int(lowest + BUDGET_FRACTION * (plain - lowest))
    return {
        "plain_bytes": plain,
        "smallest_bytes": lowest,
        "overhead_bytes": overhead,
        "activation_bytes": activations,
        "budget_bytes": activations + overhead,
        "strategy": cfg.memory.strategy,
        "forces_checkpointing": activations < plain,
    }


class Stopwatch:
    """Wall time with pauses (benchmark-only evaluation is not adaptation)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._since: float | None = time.perf_counter()

    def pause(self) -> None:
        if self._since is not None:
            self.total += time.perf_counter() - self._since
        self._since = None

    def resume(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> float:
        self.pause()
        return self.total


def round_record(r) -> dict:
    rec = dataclasses.asdict(r)
    rec["agreement"] = r.agreement
    rec["verdict"] = r.verdict
    return rec


def run_arm(arm: str, seed: int, cfg, teacher, args, files, truths, refs, state_dir: Path) -> dict:
    """Adapt one student on the stream, frame by frame; its curve and final scores."""
    person = args.person
    curve_truths = {k: v for k, v in truths.items() if k % args.curve_stride == 0}
    clock = Stopwatch()
    t0 = time.perf_counter()
    loop = AdaptationLoop(cfg, teacher, state_dir=state_dir)
    setup_s = time.perf_counter() - t0
    curve: list[dict] = []
    rounds: list = []

    def judge(r) -> None:
        clock.pause()
        t0 = time.perf_counter()
        ap = student_ap(
            loop.student, loop.spec, files["vtest"], curve_truths, person, args.curve_stride
        )
        curve.append(
            {
                "round": None if r is None else r.index,
                "frames_seen": loop.frames_seen,
                "agreement": None if r is None else r.agreement,
                "human_ap50": ap,
            }
        )
        log(
            f"  [{arm} seed {seed}] eval at {loop.frames_seen} frames: human AP50 {fmt(ap)} "
            f"on {len(curve_truths)} frames ({time.perf_counter() - t0:.0f} s, clock paused)"
        )
        clock.resume()

    judge(None)  # the start
    for f in video_frames(files["vtest"], 0, args.frames):
        r = loop.feed(f)
        if r is None:
            continue
        rounds.append(r)
        log(
            f"  [{arm} seed {seed}] round {r.index} frames {r.frames_seen} stride "
            f"{r.teacher_stride}: {r.verdict}; agreement {fmt(r.agreement)}; {r.strategy} "
            f"peak {format_size(r.measured_peak_bytes)} (plan "
            f"{format_size(r.predicted_peak_bytes)}), step {r.step_time_s:.2f} s"
        )
        if len(rounds) % args.curve_every == 0:
            judge(r)
    if rounds and curve[-1]["round"] != rounds[-1].index:
        judge(rounds[-1])  # after the last round
    wall = clock.stop()
    stats = loop.stats()
    log(f"  [{arm} seed {seed}] final evaluation")
    stream_ap = student_ap(loop.student, loop.spec, files["vtest"], truths, person)
    eval_ap = student_ap(loop.student, loop.spec, files["vtest"], refs["eval_labels"], person)
    plan = getattr(getattr(getattr(loop, "training", None), "chain", None), "plan", None)
    pairs = [(c["agreement"], c["human_ap50"]) for c in curve]
    pairs = [(a, h) for a, h in pairs if a is not None and h is not None]
    last = rounds[-1] if rounds else None
    row = {
        "arm": arm,
        "seed": seed,
        "ap50_stream_human": stream_ap,
        "ap50_eval_teacher": eval_ap,
        "frames": stats["frames_seen"],
        "teacher_calls": stats["teacher_calls"],
        "teacher_calls_per_frame": stats["teacher_calls_per_frame"],
        "rounds": stats["rounds"],
        "rounds_accepted": stats["rounds_accepted"],
        "rounds_rolled_back": stats["rounds_rolled_back"],
        "rounds_not_judged": stats["rounds_not_judged"],
        "wall_s": wall,
        "setup_s": setup_s,
        "loop_times": stats,
        "strategy": last.strategy if last else None,
        "strategies": sorted({r.strategy for r in rounds}),
        "budget_bytes": last.budget_bytes if last else None,
        "predicted_peak_bytes": max((r.predicted_peak_bytes for r in rounds), default=None),
        "measured_peak_bytes": max((r.measured_peak_bytes for r in rounds), default=None),
        "plan_detail": dict(plan.detail) if plan is not None else None,
        "plan_time_ratio": plan.time_ratio if plan is not None else None,
        "spearman_agreement_human": spearman([a for a, _ in pairs], [h for _, h in pairs]),
        "spearman_points": len(pairs),
        "curve": curve,
        "round_results": [round_record(r) for r in rounds],
        "config": effective(cfg),
    }
    loop.close()
    log(
        f"[{arm} seed {seed}] stream AP50 (human) {fmt(stream_ap)}, eval AP50 (teacher) "
        f"{fmt(eval_ap)}; teacher {row['teacher_calls']}/{row['frames']} frames; rounds "
        f"{row['rounds_accepted']} accepted, {row['rounds_rolled_back']} rolled back, "
        f"{row['rounds_not_judged']} not judged; {wall:.0f} s"
    )
    return row


# ------------------------------------------------------------------------ report


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def targets(rows: list[dict], refs: dict, quick: bool) -> list[tuple[str, str]]:
    """(target, verdict) pairs; a target nothing measured is "not measured"."""
    single = refs["rows"]["single"].get("ap50_stream")
    by = {(r["arm"], r["seed"]): r for r in rows}
    adapted = [r for r in rows if r["arm"] == "adapted"]

    def verdict(oks: list[bool | None], unit: str = "seeds") -> str:
        known = [ok for ok in oks if ok is not None]
        if not known:
            return "not measured"
        met = sum(known)
        if met == len(oks):
            return "PASS"
        unknown = len(oks) - len(known)
        tail = f", {unknown} not measured" if unknown else ""
        return f"MISSED ({met} of {len(oks)} {unit}{tail})"

    def gain(r: dict) -> bool | None:
        ap = r["ap50_stream_human"]
        return None if ap is None or single is None else ap - single >= TARGET_GAIN

    def stretch(r: dict) -> bool | None:
        ap = r["ap50_stream_human"]
        return None if ap is None else ap >= TARGET_STRETCH

    pairs = [
        (by[("adapted", s)], by.get(("scratch", s))) for s in sorted({r["seed"] for r in adapted})
    ]
    out = [
        (
            f"adapted - teacher (single look, {fmt(single)} here; {TEACHER_REFERENCE} measured "
            f"before) >= {TARGET_GAIN:.2f} AP50 on the stream, every seed",
            verdict([gain(r) for r in adapted]) if adapted else "not measured",
        ),
        (
            f"stretch: adapted >= {TARGET_STRETCH:.2f} AP50 on the stream, every seed",
            verdict([stretch(r) for r in adapted]) if adapted else "not measured",
        ),
        (
            f"wall time <= {TARGET_WALL_S:.0f} s per adaptation (every arm and seed)",
            verdict([r["wall_s"] <= TARGET_WALL_S for r in rows], "runs")
            if rows
            else "not measured",
        ),
        (
            f"teacher <= {TARGET_CALLS} calls per frame (every arm and seed)",
            verdict([r["teacher_calls_per_frame"] <= TARGET_CALLS for r in rows], "runs")
            if rows
            else "not measured",
        ),
        (
            "adapted >= scratch on the stream, per seed (the factory is a real start)",
            verdict(
                [
                    None
                    if s is None or a["ap50_stream_human"] is None or s["ap50_stream_human"] is None
                    else a["ap50_stream_human"] >= s["ap50_stream_human"]
                    for a, s in pairs
                ]
            )
            if pairs and any(s is not None for _, s in pairs)
            else "not measured",
        ),
    ]
    if quick:
        out = [(t, f"{v} (QUICK run: not the measurement)") for t, v in out]
    return out


def write_results(args, refs, factory, budget, rows, load_start, total_s) -> None:
    from provenance import commit, provenance, write_report

    quick = "QUICK smoke run (tiny settings; not a measurement) - " if args.quick else ""
    stream = f"vtest 0-{args.frames - 1}"
    e0, e1 = args.eval_range
    lines = [
        f"# {quick}Viewpoint adaptation on vtest.avi, judged on human boxes",
        "",
        *provenance(
            torch.get_num_threads(),
            f"Whole run {total_s / 60:.1f} min; state directory {args.state_dir}; "
            f"allocator {loaded_allocator()}.",
            load_before=load_start,
        ),
        "",
        f"Stream: {stream} (frames fed one by one to `AdaptationLoop.feed`; "
        f"{refs['human_boxes']} human boxes: every row of the PETS09-S2L1 ground truth, also "
        f"those with conf 0). Evaluation frames: vtest {e0}-{e1 - 1}, never trained on, "
        f"judged against the {refs['eval_labeller']['look']}-look teacher's labels (score >= "
        f"{refs['eval_labeller']['score_threshold']:g}). AP50 of class person; predictions at "
        f"scores >= {EVAL_SCORE}.",
        "",
        "## Teacher and factory",
        "",
        "| who | AP50 vs human, stream | AP50 vs teacher, eval frames | s per labelled frame "
        "| note |",
        "|---|---|---|---|---|",
    ]
    for name, row in refs["rows"].items():
        if not row["available"]:
            lines.append(
                f"| teacher, {name} look (tiles={row['tiles']}) | not available | | | "
                f"{row['why']} |"
            )
            continue
        when = f"cached, measured {row['measured_at']}" if row["cached"] else "measured now"
        lines.append(
            f"| teacher, {name} look (tiles={row['tiles']}) | {fmt(row['ap50_stream'])} | | "
            f"{row['seconds_per_frame']:.3f} | boxes at scores >= {EVAL_SCORE}; timing {when} |"
        )
    lines.append(
        f"| factory student | {fmt(factory['ap50_stream_human'])} | "
        f"{fmt(factory['ap50_eval_teacher'])} | | TUD frames: AP50 "
        f"{fmt(factory['ap50_tud_human'])} (trained on these frames' teacher labels, judged "
        f"on human boxes); {factory['rounds']} rounds |"
    )
    b = budget
    t = rows[0]["config"]["teacher"] if rows else None
    loop_teacher = (
        "n/a (no arm ran)"
        if t is None
        else f"{t['model']}, score >= {t['score_threshold']:g}"
        + (f", tiles = {t['tiles']}" if "tiles" in t else " (single look: no [teacher] tiles here)")
    )
    lines += [
        "",
        "## Arms",
        "",
        f"Memory budget forced to {format_size(b['budget_bytes'])}: for activations the "
        f"smallest feasible {format_size(b['smallest_bytes'])} + {BUDGET_FRACTION} x (plain "
        f"{format_size(b['plain_bytes'])} - smallest), plus the step overhead measured on "
        f"this machine before the run ({format_size(b.get('overhead_bytes', 0))}), strategy "
        f"{b['strategy']}: "
        + (
            "forces checkpointing (plain training does not fit)."
            if b["forces_checkpointing"]
            else "does NOT force checkpointing."
        ),
        f"The loop's teacher: {loop_teacher}.",
        "Wall time = the adaptation (loop set-up, video reading, teacher, rounds), the "
        "benchmark's own evaluations excluded.  Spearman = rank correlation of the round's "
        "held-out agreement (student vs teacher) with the student's human AP50 over the "
        "evaluated rounds.",
        "",
        "| seed | arm | AP50 vs human, stream | - teacher (single) | AP50 vs teacher, eval "
        "frames | teacher calls / frame | rounds accepted / rolled back / not judged | wall s "
        "| plan: strategy, predicted / measured peak | Spearman (points) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    single = refs["rows"]["single"].get("ap50_stream")
    quick_set = f"; QUICK settings {json.dumps(QUICK['set'])}" if args.quick else ""
    for r in rows:
        gap = (
            None
            if r["ap50_stream_human"] is None or single is None
            else r["ap50_stream_human"] - single
        )
        source = (r["plan_detail"] or {}).get("source")
        over = (r["measured_peak_bytes"] or 0) > b["budget_bytes"]
        plan = (
            f"{'/'.join(r['strategies']) or 'no round'}"
            f"{f' ({source})' if source else ''}, "
            f"{format_size(r['predicted_peak_bytes'] or 0)} / "
            f"{format_size(r['measured_peak_bytes'] or 0)}{' (over the budget)' if over else ''}"
        )
        lines.append(
            f"| {r['seed']} | {r['arm']} | {fmt(r['ap50_stream_human'])} | {fmt(gap, '+.3f')} | "
            f"{fmt(r['ap50_eval_teacher'])} | {r['teacher_calls_per_frame']:.2f} "
            f"({r['teacher_calls']}/{r['frames']}) | {r['rounds_accepted']} / "
            f"{r['rounds_rolled_back']} / {r['rounds_not_judged']} | {r['wall_s']:.0f} | "
            f"{plan} | {fmt(r['spearman_agreement_human'], '+.2f')} "
            f"({r['spearman_points']}) |"
        )
    lines += [
        "",
        "Predicted peak = the largest the plan predicted in any round; measured = the largest "
        "RSS growth over a round's baseline while it stepped (it includes what the plan does "
        "not model).",
        "",
        "Config: the project's defaults with `[training] seed`, `[student] weights` (adapted "
        f"arm) and `[memory] budget` set{quick_set}"
        f"; `--set`: {json.dumps(args.overrides) if args.overrides else 'none'} (effective "
        "config in the json).",
        "",
        "## Targets",
        "",
    ]
    lines += [f"- {t}: **{v}**" for t, v in targets(rows, refs, args.quick)]
    name = "adaptation"
    if args.default_out and (args.quick or args.frames != STREAM_FRAMES):
        name = "adaptation-quick" if args.quick else "adaptation-partial"
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out / f"{name}.md", lines)
    report = {
        "quick": args.quick,
        "command": " ".join([PROG, *sys.argv[1:]]),
        "commit": commit(),
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
        "allocator": loaded_allocator(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "total_s": total_s,
        "stream_frames": args.frames,
        "eval_frames": list(args.eval_range),
        "curve_every": args.curve_every,
        "curve_stride": args.curve_stride,
        "overrides": args.overrides,
        "quick_settings": QUICK if args.quick else None,
        "teacher": {k: v for k, v in refs.items() if k != "eval_labels"},
        "factory": factory,
        "budget": budget,
        "rows": rows,
        "targets": [{"target": t, "verdict": v} for t, v in targets(rows, refs, args.quick)],
    }
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out / f'{name}.json'}", file=sys.stderr)
    plot(args.out / f"{name}.png", rows, refs, args.quick)


def plot(path: Path, rows: list[dict], refs: dict, quick: bool) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"{PROG}: matplotlib is not installed: no {path.name}", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    colours = {"adapted": "tab:blue", "scratch": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    for i, r in enumerate(rows):
        style = dict(color=colours.get(r["arm"]), ls=styles[i % len(styles)], marker="o", ms=3)
        pts = [
            (c["frames_seen"], c["human_ap50"]) for c in r["curve"] if c["human_ap50"] is not None
        ]
        if pts:
            top.plot(*zip(*pts, strict=True), label=f"{r['arm']} seed {r['seed']}", **style)
        agr = [
            (x["frames_seen"], x["agreement"])
            for x in r["round_results"]
            if x["agreement"] is not None
        ]
        if agr:
            bottom.plot(*zip(*agr, strict=True), label=f"{r['arm']} seed {r['seed']}", **style)
    for (name, row), colour in zip(refs["rows"].items(), ("black", "grey"), strict=True):
        if row["available"] and row["ap50_stream"] is not None:
            label = f"teacher {name} look {row['ap50_stream']:.3f}"
            top.axhline(row["ap50_stream"], color=colour, ls="--", lw=1, label=label)
    top.set_ylabel("student AP50 vs human boxes (person)")
    top.set_title(("QUICK - " if quick else "") + "Adaptation on vtest.avi")
    for ax in (top, bottom):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    bottom.set_ylabel("held-out agreement (vs teacher)")
    bottom.set_xlabel("stream frames seen")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


# -------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared" / "data",
        help="folder with vtest.avi, PETS09-S2L1-stream.gt.txt and the TUD videos with "
        "their .gt.txt (default: ../shared/data beside the repository)",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", choices=["adapted", "scratch"], default=None)
    ap.add_argument(
        "--frames",
        type=int,
        default=None,
        help=f"stream frames 0..N-1 (default {STREAM_FRAMES}, the frames with human boxes)",
    )
    ap.add_argument("--curve-every", type=int, default=None, help="rounds between curve points")
    ap.add_argument(
        "--curve-stride", type=int, default=None, help="curve on every k-th stream frame"
    )
    ap.add_argument(
        "--set",
        dest="set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key (TOML literal), repeatable",
    )
    ap.add_argument("--quick", action="store_true", help="tiny smoke run, labelled QUICK")
    ap.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        / "waggle-trainer"
        / "bench-adaptation",
        help="profile cache and the bench's caches (teacher boxes, factory student)",
    )
    ap.add_argument("--fresh", action="store_true", help="recompute cached teacher boxes/factory")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results")
    ap.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads (default: every core, as a node trains; on a shared machine "
        "more threads than free cores make every step slower)",
    )
    args = ap.parse_args(argv)
    q = args.quick
    args.arms = args.arms or ["adapted", "scratch"]
    args.arms = list(dict.fromkeys(args.arms))
    args.frames = args.frames or (QUICK["frames"] if q else STREAM_FRAMES)
    args.curve_every = args.curve_every or (QUICK["curve_every"] if q else 4)
    args.curve_stride = args.curve_stride or (QUICK["curve_stride"] if q else 5)
    args.factory_frames_per_video = QUICK["factory_frames_per_video"] if q else None
    e0 = EVAL_RANGE[0]
    args.eval_range = (e0, e0 + QUICK["eval_frames"]) if q else EVAL_RANGE
    args.quick_set = QUICK["set"] if q else {}
    args.default_out = args.out is None
    args.out = args.out or ROOT / "bench" / "results"
    if not 1 <= args.frames <= STREAM_FRAMES:
        ap.error(f"--frames: 1..{STREAM_FRAMES} (the stream frames with human boxes)")
    if args.curve_every < 1 or args.curve_stride < 1:
        ap.error("--curve-every and --curve-stride must be >= 1")
    return args


def run(args: argparse.Namespace) -> int:
    load_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    files = find_data(args.data)
    args.overrides = parse_set(args.set)
    base = make_config(args.quick_set, args.overrides)
    if "person" not in base.task.classes:
        raise BenchError(f"task.classes {base.task.classes}: the bench judges class 'person'")
    args.person = base.task.classes.index("person")
    state_dir, cache_dir = args.state_dir, args.state_dir / "cache"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"{exc.filename}: {exc.strerror}") from None
    log(
        f"{'QUICK ' if args.quick else ''}run: stream 0:{args.frames}, seeds {args.seeds}, "
        f"arms {args.arms}, load average {load_start:.1f}, torch threads {args.threads}"
    )

    refs = teacher_references(args.overrides, args, files, args.person, cache_dir)
    path, spec, factory_model, factory = factory_student(
        args, args.overrides, files, args.person, cache_dir, state_dir
    )
    truths = read_gt(files["stream_gt"], args.person, args.frames)
    factory["ap50_stream_human"] = student_ap(
        factory_model, spec, files["vtest"], truths, args.person
    )
    factory["ap50_eval_teacher"] = student_ap(
        factory_model, spec, files["vtest"], refs["eval_labels"], args.person
    )
    del factory_model
    log(
        f"factory student: stream AP50 (human) {fmt(factory['ap50_stream_human'])}, eval "
        f"AP50 (teacher) {fmt(factory['ap50_eval_teacher'])}"
    )

    def arm_config(arm: str, seed: int, budget: int | str = "auto"):
        forced = {
            "training": {"seed": seed},
            "student": {"weights": str(path) if arm == "adapted" else None},
            "memory": {"budget": budget},
        }
        return make_config(args.quick_set, forced, args.overrides)

    probe_cfg = arm_config(args.arms[0], args.seeds[0])
    try:
        teacher = load_teacher(probe_cfg)
    except TeacherError as exc:
        raise BenchError(str(exc)) from None
    budget = forced_budget(probe_cfg, teacher, state_dir)
    log(
        f"memory budget {format_size(budget['budget_bytes'])} (plain "
        f"{format_size(budget['plain_bytes'])}, smallest {format_size(budget['smallest_bytes'])})"
    )
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            cfg = arm_config(arm, seed, budget["budget_bytes"])
            log(f"[{arm} seed {seed}] adapting on vtest 0:{args.frames}")
            rows.append(run_arm(arm, seed, cfg, teacher, args, files, truths, refs, state_dir))
    total = time.perf_counter() - STARTED
    write_results(args, refs, factory, budget, rows, load_start, total)
    print("Targets:")
    for t, v in targets(rows, refs, args.quick):
        print(f"  {v}: {t}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (BenchError, StudentError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
