#!/usr/bin/env bash
# Make the Docker sandbox usable on this machine; idempotent, safe to run repeatedly.
#
#   1. installs docker.io, mmdebstrap and runsc (gVisor) with apt when missing (needs root),
#   2. registers runsc with dockerd in /etc/docker/daemon.json (ptrace platform, no
#      network, host unix sockets openable: the LLM gateway's socket) and reloads the
#      daemon with SIGHUP when that changed,
#   3. starts dockerd in the background when the daemon does not answer (waits <= 60 s),
#   4. builds the sandbox image (mas2c-sandbox:latest) when it is missing, through
#      `python -m mas2c.sandbox build --if-missing` (what `mas2c sandbox build` wraps):
#      offline-capable, it makes a Debian base with mmdebstrap when no registry answers.
#
# Environment: PYTHON (default: the repo's .venv/bin/python, else python3),
#              DOCKERD_LOG (default: /var/log/mas2c-dockerd.log).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/mas2c-dockerd.log}"

say() { echo "ensure-docker: $*" >&2; }
die() { say "error: $*"; exit 1; }

# 1. packages
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker >/dev/null 2>&1 || missing+=(docker.io)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
command -v runsc >/dev/null 2>&1 || missing+=(runsc)
if ((${#missing[@]})); then
    [[ "$(id -u)" == 0 ]] || die "need root to install: apt-get install ${missing[*]}"
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    say "installing ${missing[*]} ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. gVisor: register runsc (merged into an existing daemon.json, other keys kept)
RUNSC="$(command -v runsc || true)"
changed=0
if [[ -n "$RUNSC" && "$(id -u)" == 0 ]]; then
    mkdir -p /etc/docker
    changed="$("$PYTHON" - "$RUNSC" <<'PY'
import json, os, sys
path, runsc = "/etc/docker/daemon.json", sys.argv[1]
try:
    with open(path) as f:
        config = json.load(f)
except FileNotFoundError:
    config = {}
want = {"path": runsc, "runtimeArgs": ["--platform=ptrace", "--network=none", "--host-uds=open"]}
if config.get("runtimes", {}).get("runsc") == want:
    print(0)
else:
    config.setdefault("runtimes", {})["runsc"] = want
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    print(1)
PY
)"
fi

# 3. daemon
if ! docker info >/dev/null 2>&1; then
    if [[ -n "${DOCKER_HOST:-}" && "${DOCKER_HOST}" != unix:///var/run/docker.sock ]]; then
        die "DOCKER_HOST=$DOCKER_HOST does not answer (not starting a local dockerd for it)"
    fi
    [[ "$(id -u)" == 0 ]] || die "the Docker daemon is not running; start it as root: dockerd &"
    say "starting dockerd (log: $DOCKERD_LOG) ..."
    nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 || { tail -n 20 "$DOCKERD_LOG" >&2; die "dockerd did not come up in 60 s"; }
fi
say "daemon up: $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?')"
if [[ "$changed" == 1 ]]; then
    pid="$(pidof dockerd || true)"
    if [[ -n "$pid" ]]; then
        say "registered runsc in /etc/docker/daemon.json; reloading dockerd (SIGHUP)"
        kill -HUP $pid
    fi
fi
if [[ -n "$RUNSC" ]]; then
    for _ in $(seq 20); do
        docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"' && break
        sleep 0.5
    done
    docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"' \
        || say "warning: runsc is installed but dockerd does not list it (see /etc/docker/daemon.json)"
fi

# 4. image
cd "$ROOT"
"$PYTHON" -m mas2c.sandbox build --if-missing
say "sandbox ready"
