#!/usr/bin/env bash
# Install waggle-trainer on a node: a Python environment, the systemd unit, a config
# file to edit.  Idempotent: running it again changes only what differs.
#
#   deploy/install-node.sh [--dry-run] [--root DIR] [--skip-pip] [--enable]
#
#   --dry-run   print what would be done, change nothing
#   --root DIR  install under DIR instead of / (packaging, CI); implies no systemctl
#   --skip-pip  do not create the virtualenv or install Python packages
#   --enable    also `systemctl enable --now waggle-trainer` (default: only daemon-reload)
#
# Environment: PYTHON (interpreter for the virtualenv, default python3), TORCH_INDEX
# (where CPU-only torch wheels come from), EXTRAS (optional extras, e.g. "demo" for the
# reference teacher), VENV_ARGS / PIP_ARGS (extra arguments for `python -m venv` /
# `pip install`, e.g. PIP_ARGS="--no-deps --no-index" offline).
#
# The service runs as a transient user (systemd DynamicUser=) with its state in
# /var/lib/waggle-trainer (StateDirectory=), so no account or state directory is made
# here.  Node identity and credentials come from /etc/waggle (Waggle's provisioning).
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT=/
DRY=0
PIP=1
ENABLE=0
PYTHON="${PYTHON:-python3}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
read -r -a VENV_EXTRA <<< "${VENV_ARGS:-}"
read -r -a PIP_EXTRA <<< "${PIP_ARGS:-}"
PACKAGE="$SRC${EXTRAS:+[$EXTRAS]}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --root) [ $# -ge 2 ] || { echo "install-node: --root needs a directory" >&2; exit 2; }
            ROOT="$2"; shift ;;
    --root=*) ROOT="${1#--root=}" ;;
    --skip-pip) PIP=0 ;;
    --enable) ENABLE=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install-node: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -d "$ROOT" ] || { echo "install-node: --root $ROOT: not a directory" >&2; exit 2; }
ROOT="$(cd "$ROOT" && pwd)"
P="${ROOT%/}"  # prefix for every path; empty for /

VENV="$P/opt/waggle-trainer/venv"
UNIT_DIR="$P/etc/systemd/system"
CONF_DIR="$P/etc/waggle-trainer"
WAGGLE_ETC="$P/etc/waggle"
changed=0

say() { echo "install-node: $*"; }
run() {  # run a command, or only show it with --dry-run
  if [ "$DRY" = 1 ]; then say "would run: $*"; else "$@"; fi
}

# install SRC DEST MODE: copy when DEST is missing or different
install_file() {
  local src="$1" dest="$2" mode="$3"
  if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
    say "unchanged: ${dest#"$P"}"
    return
  fi
  changed=1
  if [ "$DRY" = 1 ]; then say "would install: ${dest#"$P"} (mode $mode)"; return; fi
  install -D -m "$mode" "$src" "$dest"
  say "installed: ${dest#"$P"}"
}

# 1. Python environment (CPU-only torch from PyTorch's index; aarch64 and x86_64 wheels)
if [ "$PIP" = 1 ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    changed=1
    run "$PYTHON" -m venv "${VENV_EXTRA[@]}" "$VENV"
  fi
  run "$VENV/bin/python" -m pip install --quiet --extra-index-url "$TORCH_INDEX" \
    "${PIP_EXTRA[@]}" "$PACKAGE"
else
  say "skipped: Python environment (--skip-pip)"
fi

# 2. The unit (ExecStart points into the virtualenv)
install_file "$SRC/systemd/waggle-trainer.service" "$UNIT_DIR/waggle-trainer.service" 0644

# 3. A config to edit; an existing one is never overwritten
if [ -e "$CONF_DIR/node.toml" ]; then
  say "kept: ${CONF_DIR#"$P"}/node.toml (exists)"
else
  install_file "$SRC/deploy/node.example.toml" "$CONF_DIR/node.toml" 0644
fi

# 4. What Waggle's provisioning must have put in /etc/waggle
for f in node-id train-hmac.key; do
  [ -e "$WAGGLE_ETC/$f" ] || say "warning: ${WAGGLE_ETC#"$P"}/$f is missing (see docs/deploy.md)"
done

# 5. The default malloc ([memory] allocator = "tcmalloc"): a distribution package,
#    not installed here; without it the daemon says so once and uses glibc's malloc.
if command -v dpkg >/dev/null 2>&1 && ! dpkg -s libtcmalloc-minimal4 >/dev/null 2>&1; then
  say "note: libtcmalloc-minimal4 is not installed (apt-get install libtcmalloc-minimal4);" \
      "training runs under glibc's malloc without it (slower checkpointed steps)"
fi

# 6. systemd
if [ "$ROOT" = / ] && command -v systemctl >/dev/null 2>&1; then
  [ "$changed" = 0 ] || run systemctl daemon-reload
  if [ "$ENABLE" = 1 ]; then
    run systemctl enable --now waggle-trainer.service
  else
    say "next: edit /etc/waggle-trainer/node.toml, then: systemctl enable --now waggle-trainer"
  fi
else
  say "skipped: systemctl (installing under $ROOT)"
fi
[ "$changed" = 1 ] || say "nothing to do: already installed"
