"""``waggle-trainer server``, ``server-keygen`` and ``models list|show|export``."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "server",
        help="run the aggregation server (verify, aggregate, store, broadcast, status page)",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="server config (TOML)")
    p.set_defaults(handler=_server)

    p = sub.add_parser(
        "server-keygen",
        help="create the server's Ed25519 model-signing key "
        "(PATH, mode 0600) and its public key PATH.pub",
    )
    p.add_argument("path")
    p.set_defaults(handler=_keygen)

    p = sub.add_parser("models", help="list, show or export stored model versions")
    p.add_argument("--config", required=True, metavar="FILE", help="server config (TOML)")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    q = msub.add_parser("list", help="every version of every model")
    q.add_argument("--model", help="only this model")
    q.set_defaults(handler=_list)
    q = msub.add_parser("show", help="the manifest of one version")
    q.add_argument("model")
    q.add_argument("version")
    q.set_defaults(handler=_show)
    q = msub.add_parser("export", help="copy a version's weights to a safetensors file")
    q.add_argument("model")
    q.add_argument("version")
    q.add_argument("out", help="output path (.safetensors)")
    q.set_defaults(handler=_export)


def _config(args):
    from waggle_trainer.config import ConfigError

    from .config import load_server_config

    try:
        return load_server_config(args.config)
    except ConfigError as exc:
        for line in exc.lines():
            print(line)
        return None


def _server(args) -> int:
    from waggle_trainer.config import ConfigError

    from .signing import check_files

    cfg = _config(args)
    if cfg is None:
        return 2
    try:
        key = check_files(cfg, args.config)
    except ConfigError as exc:
        for line in exc.lines():
            print(line)
        return 2
    if args.log_level is None:
        import logging

        logging.getLogger().setLevel(cfg.server.log_level.upper())
    from .app import run  # torch and pika: only once the config is known to be good

    return run(cfg, key, args.config)


def _keygen(args) -> int:
    from .signing import generate_signing_key

    try:
        pub = generate_signing_key(args.path)
    except FileExistsError:
        print(f"{args.path}: exists (refusing to overwrite a signing key)")
        return 2
    except OSError as e:
        print(f"{args.path}: cannot be written: {e.strerror}")
        return 2
    print(
        f"private key {args.path} (keep it on the server), public key {pub} (give it to every node)"
    )
    return 0


def _store(cfg):
    from .store import ModelStore

    return ModelStore(
        Path(cfg.server.state_dir) / "models", retain=cfg.store.retain_versions, create=False
    )


def _list(args) -> int:
    cfg = _config(args)
    if cfg is None:
        return 2
    store = _store(cfg)
    models = [args.model] if args.model else store.models()
    rows = [
        (
            "model",
            "version",
            "parent",
            "created (UTC)",
            "updates",
            "nodes",
            "samples",
            "rule",
            "weights",
        )
    ]
    for m in models:
        for v in store.versions(m):
            man = v.manifest
            created = time.strftime(
                "%Y-%m-%d %H:%M:%S", time.gmtime(man.get("created_ns", 0) / 1e9)
            )
            rows.append(
                (
                    m,
                    v.version,
                    str(man.get("parent") or "-"),
                    created,
                    str(len(man.get("contributors", []))),
                    str(len(man.get("nodes", []))),
                    str(man.get("samples", 0)),
                    man.get("rule", {}).get("rule", "?"),
                    "retired" if v.retired else "kept",
                )
            )
    if len(rows) == 1:
        print(f"no stored versions{' of ' + args.model if args.model else ''} in {store.root}")
        return 1 if args.model else 0
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _version(args):
    cfg = _config(args)
    if cfg is None:
        return None, 2
    info = _store(cfg).get(args.model, args.version)
    if info is None:
        print(
            f"model {args.model!r} has no version {args.version!r} "
            f"(see 'waggle-trainer models --config {args.config} list')"
        )
        return None, 1
    return info, 0


def _show(args) -> int:
    info, rc = _version(args)
    if info is None:
        return rc
    json.dump(dict(info.manifest, retired=info.retired), sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


def _export(args) -> int:
    import hashlib

    info, rc = _version(args)
    if info is None:
        return rc
    if info.retired:
        print(
            f"model {args.model} version {args.version} is retired: its weights were removed "
            "by the retention policy (store.retain_versions)"
        )
        return 1
    out = Path(args.out)
    if out.suffix != ".safetensors":
        print(f"{out}: the output must be a .safetensors file")
        return 2
    data = info.weights.read_bytes()
    if hashlib.sha256(data).hexdigest() != info.manifest["weights_sha256"]:
        print(f"{info.weights}: content differs from its manifest; not exported")
        return 1
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_bytes(data)
        shutil.move(tmp, out)
    except OSError as e:
        print(f"{out}: cannot be written: {e.strerror}")
        return 2
    print(f"{args.model} version {args.version} -> {out} ({len(data)} bytes)")
    return 0
