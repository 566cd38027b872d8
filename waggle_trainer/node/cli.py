"""``waggle-trainer run`` (the node daemon) and ``waggle-trainer status``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from waggle_trainer.common import format_size
from waggle_trainer.learn.cli import positive_int

EXIT_USAGE = 2


def positive_seconds(value: str) -> float:
    """argparse type: a finite number of seconds > 0, else one clear line."""
    try:
        x = float(value)
    except ValueError:
        x = 0.0
    if not x > 0 or x != x or x == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds > 0")
    return x


def register(sub) -> None:
    p = sub.add_parser(
        "run",
        help="the node daemon: camera -> teacher -> student -> updates -> broker",
        description="Run the node daemon (under systemd: Type=notify). Without bounds it runs "
        "until SIGTERM.",
    )
    p.add_argument(
        "--config", type=Path, default=None, help="node config file (default: embedded defaults)"
    )
    p.add_argument(
        "--max-rounds", type=positive_int, default=None, help="stop after N rounds in this run"
    )
    p.add_argument(
        "--duration",
        type=positive_seconds,
        default=None,
        metavar="S",
        help="stop after S seconds of training",
    )
    p.add_argument("--json", action="store_true", help="print the end-of-run summary as JSON")
    p.set_defaults(handler=run_command)

    p = sub.add_parser(
        "status",
        help="the node's training state and outbox, read from disk (the daemon need not run)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="node config file (for [state] dir; default: embedded defaults)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--progress-within",
        type=positive_seconds,
        default=None,
        metavar="S",
        help="health check: exit 0 if the daemon processed a frame or a step in "
        "the last S seconds, else 1 (one line)",
    )
    p.set_defaults(handler=status_command)


def _load(args):
    from waggle_trainer.config import ConfigError, default_config, load_config

    try:
        return load_config(args.config) if args.config else default_config()
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return None


def run_command(args, **factories: Any) -> int:
    """``waggle-trainer run``; ``factories`` (loop_factory, source_factory) for tests."""
    from waggle_trainer.common import setup_logging

    cfg = _load(args)
    if cfg is None:
        return EXIT_USAGE
    if getattr(args, "log_level", None) is None:
        setup_logging(cfg.node.log_level)
    from waggle_trainer.remat.allocator import reexec_under

    # [memory] allocator, before torch is imported
    reexec_under(cfg.memory.allocator, getattr(args, "reexec_argv", None))
    from waggle_trainer.node.daemon import Daemon

    daemon = Daemon(
        cfg,
        config_path=args.config,
        max_rounds=args.max_rounds,
        duration_s=args.duration,
        **factories,
    )
    code = daemon.run()
    if code != 0:
        return code
    summary = daemon.summary()
    import logging

    logging.getLogger("waggle_trainer.daemon").info(
        "stopped (%s): round %d, %d rounds this run (%s), outbox %d, published %d",
        summary["exit_reason"],
        summary["round"],
        summary["rounds_this_run"],
        verdict_counts(summary["accepted"], summary["rolled_back"], summary["not_judged"]),
        summary["outbox_updates"],
        summary["published"],
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    elif args.max_rounds is not None or args.duration is not None:
        print("\n".join(summary_lines(summary)))
    return 0


def verdict_counts(accepted: int, rolled_back: int, not_judged: int) -> str:
    """``3 accepted, 1 rolled back`` (``, 2 not judged`` when there were such rounds)."""
    out = f"{accepted} accepted, {rolled_back} rolled back"
    return out + (f", {not_judged} not judged" if not_judged else "")


def summary_lines(s: dict[str, Any]) -> list[str]:
    def agreement(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [
        f"stopped: {s['exit_reason']} after {s['wall_s']:.1f} s",
        f"rounds: {s['rounds_this_run']} this run "
        f"({verdict_counts(s['accepted'], s['rolled_back'], s['not_judged'])}), "
        f"now at round {s['round']}, base {s['base_version']}",
        f"agreement with the teacher: {agreement(s['agreement_first'])} -> "
        f"{agreement(s['agreement_last'])}",
        f"frames: {s['frames_seen']} fed to the loop, teacher called "
        f"{s['teacher_calls']} times ({s['teacher_calls_per_frame']:.2f} per frame)",
    ]
    if "strategy" in s:
        lines.append(
            f"memory: {s['strategy']} plan, budget {format_size(s['budget_bytes'])}, "
            f"predicted peak {format_size(max(1, s['predicted_peak_bytes']))}, "
            f"measured {format_size(max(1, s['measured_peak_bytes']))}; "
            f"step {s['step_time_s']:.2f} s; allocator {s['allocator']}"
        )
    last = f" (last {format_size(s['last_update_bytes'])})" if s["last_update_bytes"] else ""
    lines.append(
        f"updates: {s['updates']} made{last}, {s['published']} delivered to the broker, "
        f"{s['outbox_updates']} in the outbox ({format_size(s['outbox_bytes'])})"
    )
    if s.get("adopted_versions"):
        versions = s["adopted_versions"]
        lines.append(
            f"global models: version{'s' if len(versions) > 1 else ''} "
            f"{', '.join(versions)} adopted this run"
        )
    if s["disk_full_events"]:
        lines.append(f"disk full: {s['disk_full_events']} failed write(s); see the log")
    return lines


# ----------------------------------------------------------------- status


def read_status(state_dir: Path) -> dict[str, Any]:
    """What the state file and the outbox say, without touching either."""
    from waggle_trainer.node.state import StateError, StateStore
    from waggle_trainer.transport import UpdateRejected, peek_envelope
    from waggle_trainer.transport.outbox import SUFFIX

    out: dict[str, Any] = {"state_dir": str(state_dir)}
    store = StateStore(state_dir / "node")
    try:
        meta = store.read_meta()
    except StateError as exc:
        meta = None
        out["state_error"] = str(exc)
    now_ns = time.time_ns()
    if meta is None:
        out["state"] = None
    else:
        hist = meta.get("history") or []
        last = hist[-1] if hist else {}
        counters = meta.get("counters", {})
        out["state"] = {
            "round": meta.get("round"),
            "epoch": meta.get("epoch"),
            "base_version": meta.get("base_version"),
            "saved_age_s": round((now_ns - int(meta.get("saved_ns", now_ns))) / 1e9, 1),
            "accepted": counters.get("accepted", 0),
            "rolled_back": counters.get("rolled_back", 0),
            "not_judged": counters.get("not_judged", 0),
            "updates": counters.get("updates", 0),
            "adopted": counters.get("adopted", 0),
            "stale_dropped": counters.get("stale_dropped", 0),
            "budget_bytes": last.get("budget_bytes"),
            "strategy": last.get("strategy"),
            "predicted_peak_bytes": last.get("predicted_peak_bytes"),
            "measured_peak_bytes": last.get("measured_peak_bytes"),
            "allocator": meta.get("allocator"),
            "last_publish_age_s": None
            if not meta.get("last_publish_ns")
            else round((now_ns - int(meta["last_publish_ns"])) / 1e9, 1),
            "history": [
                {
                    k: h.get(k)
                    for k in (
                        "round",
                        "accepted",
                        "judged",
                        "why_not_judged",
                        "holdout_labels",
                        "holdout_labels_needed",
                        "agreement_before",
                        "agreement_after",
                        "loss",
                        "samples",
                    )
                }
                for h in hist[-10:]
            ],
        }
    entries = []
    outbox = state_dir / "outbox"
    if outbox.is_dir():
        for p in sorted(outbox.glob(f"*{SUFFIX}")):
            try:
                with open(p, "rb") as f:
                    env = peek_envelope(f.read(70_000))
                size = p.stat().st_size
            except (OSError, UpdateRejected):
                continue  # being replaced or unreadable: the daemon handles it
            entries.append((env, size))
    out["outbox"] = {
        "updates": len(entries),
        "bytes": sum(s for _, s in entries),
        "oldest_age_s": round((now_ns - min(e.created_ns for e, _ in entries)) / 1e9, 1)
        if entries
        else None,
        "rounds": [e.round for e, _ in entries][-20:],
    }
    return out


def progress_check(state_dir: Path, within_s: float) -> int:
    from waggle_trainer.node.daemon import PROGRESS_EVERY_S, PROGRESS_FILE

    path = state_dir / "node" / PROGRESS_FILE
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        print(f"unhealthy: no progress recorded in {path}")
        return 1
    if age > within_s + PROGRESS_EVERY_S:
        print(f"unhealthy: last frame or step {age:.0f} s ago (allowed {within_s:g} s)")
        return 1
    print(f"healthy: last frame or step within {max(age, 0):.0f} s")
    return 0


def history_line(h: dict[str, Any]) -> str:
    """One round of the saved history: agreement before -> after, loss, verdict (a
    round without held-out evidence says so; "judged" is absent from older states)."""
    loss = f"loss {h['loss']:.4f}" if h.get("loss") is not None else "loss not finite"
    if h.get("judged") is False:
        return f"not judged ({h.get('why_not_judged')})  {loss}"
    before, after = h.get("agreement_before"), h.get("agreement_after")
    mark = "accepted" if h["accepted"] else "rolled back"
    if before is None or after is None:
        return f"{loss}  {mark}"
    return f"{before:.3f} -> {after:.3f}  {loss}  {mark}"


def status_command(args) -> int:
    cfg = _load(args)
    if cfg is None:
        return EXIT_USAGE
    state_dir = Path(cfg.state.dir)
    if args.progress_within is not None:
        return progress_check(state_dir, args.progress_within)
    st = read_status(state_dir)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0 if st.get("state") is not None else 1
    if st.get("state_error"):
        print(f"state: {st['state_error']}")
    s = st["state"]
    if s is None:
        if not st.get("state_error"):
            print(f"no training state in {state_dir} (the daemon has not completed a start here)")
    else:
        print(f"state: {state_dir}/node (saved {s['saved_age_s']:.0f} s ago)")
        print(
            f"round {s['round']}: "
            f"{verdict_counts(s['accepted'], s['rolled_back'], s['not_judged'])}, "
            f"{s['updates']} updates made; base {s['base_version']} "
            f"({s['adopted']} global model(s) adopted, {s['stale_dropped']} update(s) dropped "
            "as stale)"
        )
        memory = []
        if s["budget_bytes"]:
            memory.append(
                f"{s['strategy']} plan, budget {format_size(s['budget_bytes'])}, "
                f"last peak {format_size(max(1, s['measured_peak_bytes'] or 1))} "
                f"(predicted {format_size(max(1, s['predicted_peak_bytes'] or 1))})"
            )
        if s["allocator"]:
            memory.append(f"allocator {s['allocator']}")
        if memory:
            print("memory: " + ", ".join(memory))
        if s["history"]:
            print("recent rounds (agreement before -> after):")
            for h in s["history"]:
                print(f"  round {h['round']:>5}: {history_line(h)}")
        last = s["last_publish_age_s"]
        print(
            "last confirmed publish: "
            + (
                "never (as of the last save)"
                if last is None
                else f"{last:.0f} s ago (as of the last save)"
            )
        )
    ob = st["outbox"]
    oldest = "" if ob["oldest_age_s"] is None else f", oldest {ob['oldest_age_s']:.0f} s old"
    print(f"outbox: {ob['updates']} update(s), {format_size(ob['bytes'])}{oldest}")
    return 0 if s is not None else 1
