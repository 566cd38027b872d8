"""``waggle-trainer check-config FILE``."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("check-config", help="validate a node config file and print it resolved")
    p.add_argument("file")
    p.set_defaults(handler=_check_config)


def _check_config(args) -> int:
    from waggle_trainer.config import ConfigError, load_config, render_config

    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        for line in exc.lines():
            print(line)
        return 2
    print(render_config(cfg))
    return 0
