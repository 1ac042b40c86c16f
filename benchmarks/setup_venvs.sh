#!/usr/bin/env bash
# Virtual environments for the benchmarks, each with only what its system needs, from PyPI:
#   .venvs/plain      openai + httpx: the hand-written baseline and the compiled mas2c packages
#   .venvs/langgraph  langgraph + langchain-openai
#   .venvs/autogen    autogen-agentchat + autogen-ext[openai]
#   .venvs/report     matplotlib (for the plot in RESULTS.md)
# A failed install is reported and skipped: the benchmarks say which systems are missing.
# Idempotent: an existing venv that already imports its packages is left alone
# (BENCH_REINSTALL=1 rebuilds them all).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="$HERE/.venvs"
PYTHON="${BENCH_PYTHON:-python3}"
mkdir -p "$VENVS"

make_venv() {  # name, import check, packages...
    local name="$1" check="$2"
    shift 2
    local dir="$VENVS/$name"
    if [[ -z "${BENCH_REINSTALL:-}" && -x "$dir/bin/python" ]] && "$dir/bin/python" -c "$check" 2>/dev/null; then
        echo "setup_venvs: $name ready"
        return 0
    fi
    rm -rf "$dir"
    echo "setup_venvs: creating $name ($*)"
    if ! "$PYTHON" -m venv "$dir" >"$VENVS/$name.log" 2>&1 ||
        ! "$dir/bin/pip" install -q "$@" >>"$VENVS/$name.log" 2>&1 ||
        ! "$dir/bin/python" -c "$check" >>"$VENVS/$name.log" 2>&1; then
        echo "setup_venvs: FAILED to install $name (see $VENVS/$name.log); its benchmarks are skipped" >&2
        return 1
    fi
    echo "setup_venvs: $name ready"
}

status=0
make_venv plain "import openai, httpx" openai httpx || status=1
make_venv langgraph "import langgraph, langchain_openai" langgraph langchain-openai || status=1
make_venv autogen "import autogen_agentchat, autogen_ext.models.openai" autogen-agentchat "autogen-ext[openai]" || status=1
make_venv report "import matplotlib" matplotlib || status=1
exit $status
