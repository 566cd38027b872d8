"""Subcommands ``adapt`` (source -> teacher -> student, for a bounded number of
frames) and ``detect`` (the student or the teacher on frames, as JSON lines)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILED = 1


def _frames_arg(value: str) -> str:
    """``N`` (the first N frames) or ``A:B`` (frames A .. B-1) as a frame range."""
    text = value.strip()
    if text.isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number of frames >= 1")
        return f"0:{int(text)}"
    from waggle_trainer.config import parse_frame_range

    try:
        parse_frame_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _seed_arg(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a seed (a whole number >= 0)")
    return int(value)


def _score_arg(value: str) -> float:
    try:
        score = float(value)
    except ValueError:
        score = float("nan")
    if not 0 < score < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a score between 0 and 1 (exclusive)")
    return score


def register(sub) -> None:
    p = sub.add_parser(
        "adapt", help="adapt the student to a camera: source -> teacher -> student, then a summary"
    )
    p.add_argument("--config", type=Path, required=True, help="node config file")
    p.add_argument(
        "--frames",
        type=_frames_arg,
        default=None,
        help="N (the first N frames) or A:B (frames A..B-1); default [camera] frames",
    )
    p.add_argument("--source", default=None, help="frame source; default [camera] source")
    p.add_argument(
        "--save", type=Path, default=None, help="write the adapted student here (safetensors)"
    )
    p.add_argument("--seed", type=_seed_arg, default=None, help="default [training] seed")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=_adapt)

    p = sub.add_parser(
        "detect", help="boxes of the student (or the teacher) on frames, one JSON line per frame"
    )
    p.add_argument("--config", type=Path, required=True, help="node config file")
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="student weights (safetensors; required unless --teacher)",
    )
    p.add_argument("--source", default=None, help="frame source; default [camera] source")
    p.add_argument(
        "--frames",
        type=_frames_arg,
        default=None,
        help="N or A:B (frames A..B-1); default [camera] frames",
    )
    p.add_argument("--teacher", action="store_true", help="run the teacher instead of a student")
    p.add_argument(
        "--min-score",
        type=_score_arg,
        default=None,
        help="keep boxes scoring at least this (0 < s < 1); default [student] score_threshold "
        "(with --teacher: [teacher] score_threshold). Boxes under it are not printed: to "
        "compute a precision-recall curve or AP from the output, give a low value, e.g. 0.05",
    )
    p.add_argument(
        "--jsonl",
        action="store_true",
        help='one line per frame: {"frame": i, "boxes": [[x1,y1,x2,y2,score,class],..]}',
    )
    p.set_defaults(handler=_detect)


def _fail(prog: str, message: str, code: int) -> int:
    print(f"waggle-trainer {prog}: {message}", file=sys.stderr)
    return code


def _load(args, prog: str):
    """The config with the command line's overrides, or an exit code."""
    from waggle_trainer.common import setup_logging
    from waggle_trainer.config import ConfigError, config_from_dict, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print("\n".join(exc.lines()), file=sys.stderr)
        return None, EXIT_USAGE
    if args.log_level is None:
        setup_logging(cfg.node.log_level)
    from waggle_trainer.config import is_live_source, parse_frame_range

    camera: dict = {}
    if args.source is not None:
        camera["source"] = args.source
    args.live_range = None
    if args.frames is not None:
        if is_live_source(camera.get("source", cfg.camera.source)):
            args.live_range = parse_frame_range(args.frames)  # counted here, not seekable
        else:
            camera["frames"] = args.frames
    data = cfg.model_dump(mode="python")
    data["camera"].update(camera)
    if getattr(args, "seed", None) is not None:
        data["training"]["seed"] = args.seed
    try:
        return config_from_dict(data, f"{args.config} with the command line"), 0
    except ConfigError as exc:
        print("\n".join(exc.lines()), file=sys.stderr)
        return None, EXIT_USAGE


def _frames(source, live_range):
    """The source's frames; for a live source with ``--frames A:B``, the A-th to the
    (B-1)-th frame it delivers."""
    if live_range is None:
        yield from source
        return
    start, stop = live_range
    for n, frame in enumerate(source):
        if stop is not None and n >= stop:
            return
        if n >= start:
            yield frame


class _Progress:
    """One status line on stderr, rewritten in place; silent when not a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty and (force or now - self.last >= 0.2):
            self.last = now
            sys.stderr.write("\r\x1b[2K" + text)
            sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


def _adapt(args) -> int:
    cfg, code = _load(args, "adapt")
    if cfg is None:
        return code
    from waggle_trainer.writable import PathProblem, Target, node_state_targets, prepare

    targets = node_state_targets(cfg.state.dir, subdirs=("profiles",))  # the profile cache
    if args.save is not None:
        targets.append(Target("--save", args.save, "file", "a file this user can write"))
    try:  # before a frame is read: a run must not end in a file it cannot write
        prepare(targets)
    except PathProblem as exc:
        return _fail("adapt", str(exc), EXIT_USAGE)
    from waggle_trainer.remat.allocator import reexec_under

    # [memory] allocator, before torch is imported
    reexec_under(cfg.memory.allocator, getattr(args, "reexec_argv", None))
    from waggle_trainer.common import format_size
    from waggle_trainer.learn.adaptation import AdaptationLoop
    from waggle_trainer.learn.student import StudentError, save_student
    from waggle_trainer.learn.teachers import TeacherError, load_teacher
    from waggle_trainer.remat.planner import InfeasibleBudget
    from waggle_trainer.vision.frames import SourceError, open_source

    try:
        source = open_source(cfg.camera)
    except SourceError as exc:
        return _fail("adapt", str(exc), EXIT_FAILED)
    try:
        teacher = load_teacher(cfg)
        loop = AdaptationLoop(cfg, teacher, state_dir=cfg.state.dir)
    except (TeacherError, StudentError) as exc:
        source.close()
        return _fail("adapt", str(exc), EXIT_USAGE)
    except InfeasibleBudget as exc:
        source.close()
        return _fail("adapt", f"memory.budget: {exc}", EXIT_FAILED)
    progress = _Progress()
    first = last = None
    t0 = time.perf_counter()
    try:
        for frame in _frames(source, args.live_range):
            result = loop.feed(frame)
            if result is not None:
                if first is None and result.agreement_before is not None:
                    first = result  # the first round with enough held-out labels
                last = result
                _log_round(result)
            progress.show(_status(loop, last))
    finally:
        progress.done()
        source.close()
    elapsed = time.perf_counter() - t0
    summary = _summary(loop, first, last, elapsed, source)
    if args.save is not None:
        try:
            save_student(loop.student, loop.spec, args.save)
        except OSError as exc:
            loop.close()
            return _fail("adapt", f"--save {args.save}: cannot write ({exc.strerror})", EXIT_FAILED)
        summary["saved"] = str(args.save)
    loop.close()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, format_size)
    return 0


def _log_round(r) -> None:
    import logging

    logging.getLogger("waggle_trainer.adapt").info(
        "round %d %s; loss %.4g, %d samples, teacher stride %d, plan %s, step %.2f s",
        r.index,
        r.verdict,
        r.loss,
        r.samples,
        r.teacher_stride,
        r.strategy,
        r.step_time_s,
    )


def _status(loop, last) -> str:
    from waggle_trainer.common import format_size

    text = (
        f"frames {loop.frames_seen}  teacher {loop.teacher_calls} "
        f"(stride {loop.teacher_stride})  rounds {loop.rounds}"
    )
    if last is not None:
        judged = (
            f"agreement {loop.last_agreement:.3f}"
            if last.agreement is not None and loop.last_agreement is not None
            else f"held-out {last.holdout_labels}/{last.holdout_labels_needed} labels"
        )
        text += (
            f" ({loop.rounds_rolled_back} rolled back, {loop.rounds_not_judged} not judged)  "
            f"{judged}  plan {last.strategy} "
            f"{format_size(last.predicted_peak_bytes)}/{format_size(last.budget_bytes)}"
        )
    return text


def _summary(loop, first, last, elapsed: float, source) -> dict:
    from waggle_trainer.remat.allocator import loaded_allocator
    from waggle_trainer.remat.schedule import recomputes

    stats = loop.stats()
    plan = loop.training.chain.plan
    out = {
        "task": loop.task.kind,
        "classes": list(loop.task.classes),
        "arch": loop.spec.arch,
        "input": [loop.spec.input_width, loop.spec.input_height],
        **{
            k: stats[k]
            for k in (
                "frames_seen",
                "frames_skipped",
                "teacher_calls",
                "teacher_calls_per_frame",
                "labelled_frames",
                "steps_done",
                "rounds",
                "rounds_accepted",
                "rounds_rolled_back",
                "rounds_not_judged",
                "teacher_stride",
                "overhead_fraction",
            )
        },
        "agreement_first": first.agreement_before if first else None,
        "agreement_last": loop.last_agreement,
        "agreement_best": loop.best_agreement,
        "teacher_calls_per_label": loop.calls_per_label,
        "teacher_seconds_per_label": stats["teacher_s"] / max(1, stats["labelled_frames"]),
        "strategy": plan.strategy if plan is not None else None,
        "recomputes": plan is not None and recomputes(plan.schedule),
        "budget_bytes": loop.training.budget.activation_budget_bytes,
        "predicted_peak_bytes": plan.predicted_peak_bytes if plan is not None else None,
        "measured_peak_bytes": last.measured_peak_bytes if last else None,
        "allocator": loaded_allocator(),
        "fused_step": loop.training.fused is not None,
        "seconds": elapsed,
        "fps": loop.frames_seen / elapsed if elapsed > 0 else 0.0,
        "source": getattr(source, "stats", None) and source.stats.as_dict(),
    }
    return out


def _print_summary(s: dict, format_size) -> None:
    print(
        f"{s['arch']} {s['task']} student ({', '.join(s['classes'])}), input "
        f"{s['input'][0]}x{s['input'][1]}"
    )
    print(
        f"frames {s['frames_seen']} in {s['seconds']:.1f} s ({s['fps']:.2f} fps); teacher "
        f"labelled {s['labelled_frames']} frames, {s['teacher_calls_per_label']} call(s) each "
        f"({s['teacher_seconds_per_label']:.2f} s per labelled frame): "
        f"{s['teacher_calls_per_frame']:.2f} full-frame calls per frame, stride now "
        f"{s['teacher_stride']}"
    )
    if s["rounds"]:
        if s["agreement_first"] is None or s["agreement_last"] is None:
            agreement = (
                "held-out agreement not measured: the held-out slice never held enough "
                "teacher labels (adaptation.min_holdout_labels)"
            )
        else:
            agreement = (
                f"held-out agreement {s['agreement_first']:.3f} -> {s['agreement_last']:.3f}"
                f" (best {s['agreement_best']:.3f})"
                if s["agreement_best"] is not None
                else f"held-out agreement {s['agreement_first']:.3f} -> {s['agreement_last']:.3f}"
            )
        not_judged = f", {s['rounds_not_judged']} not judged" if s["rounds_not_judged"] else ""
        print(
            f"rounds {s['rounds']} ({s['steps_done']} steps kept): {s['rounds_accepted']} "
            f"accepted, {s['rounds_rolled_back']} rolled back{not_judged}; {agreement}"
        )
        print(
            f"memory plan {s['strategy']} "
            f"({'checkpointing' if s['recomputes'] else 'nothing recomputed'}): "
            f"activation budget {format_size(s['budget_bytes'])}, "
            f"predicted peak {format_size(s['predicted_peak_bytes'])}, measured "
            f"{format_size(s['measured_peak_bytes'])} (last round); allocator "
            f"{s['allocator']}{', optimiser step fused' if s['fused_step'] else ''}"
        )
    else:
        print("rounds 0: too few labelled frames for a round (no training happened)")
    if s.get("saved"):
        print(f"student saved to {s['saved']}")


def _detect(args) -> int:
    if not args.teacher and args.weights is None:
        return _fail("detect", "--weights FILE is required (or --teacher)", EXIT_USAGE)
    cfg, code = _load(args, "detect")
    if cfg is None:
        return code
    from waggle_trainer.learn.adaptation import predict_frames
    from waggle_trainer.learn.student import StudentError, load_student, spec_from_config
    from waggle_trainer.learn.task import task_from_config
    from waggle_trainer.learn.teachers import TeacherError, load_teacher
    from waggle_trainer.vision.frames import SourceError, open_source

    task = task_from_config(cfg)
    if task.kind != "detect":
        return _fail(
            "detect", f"task.kind is {task.kind!r}: detect needs a detect task", EXIT_USAGE
        )
    spec = spec_from_config(cfg, task)
    try:
        source = open_source(cfg.camera)
    except SourceError as exc:
        return _fail("detect", str(exc), EXIT_FAILED)
    min_score = cfg.student.score_threshold if args.min_score is None else args.min_score
    if args.teacher and args.min_score is not None:
        t = cfg.teacher.model_copy(
            update={
                "score_threshold": args.min_score,
                "ignore_threshold": min(args.min_score, cfg.teacher.ignore_threshold),
            }
        )
        cfg = cfg.model_copy(update={"teacher": t})
    try:
        if args.teacher:
            teacher, model = load_teacher(cfg), None
        else:
            teacher, model = None, load_student(args.weights, spec)
    except (TeacherError, StudentError) as exc:
        source.close()
        return _fail("detect", str(exc), EXIT_USAGE)
    progress = _Progress()
    frames = boxes = 0
    try:
        for frame in _frames(source, args.live_range):
            if teacher is not None:
                dets = teacher.label([frame.image])[0]
            else:
                assert model is not None
                dets = predict_frames(
                    model,
                    spec,
                    [frame.image],
                    min_score,
                    cfg.student.max_detections,
                )[0]
            rows = [
                [round(float(v), 2) for v in b] + [round(float(s), 4), int(c)]
                for b, s, c in zip(dets.boxes, dets.scores, dets.classes, strict=True)
            ]
            frames += 1
            boxes += len(rows)
            if args.jsonl:
                print(json.dumps({"frame": int(frame.index), "boxes": rows}), flush=False)
            else:
                names = ", ".join(f"{task.classes[int(r[5])]} {r[4]:.2f}" for r in rows)
                print(f"frame {frame.index}: {len(rows)} boxes" + (f" ({names})" if rows else ""))
            progress.show(f"frames {frames}  boxes {boxes}")
    finally:
        progress.done()
        source.close()
        sys.stdout.flush()
    return 0
