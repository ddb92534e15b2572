#!/usr/bin/env bash
# The project's two entry points on a fresh machine:
#   ./run.sh demo    the main job
#   ./run.sh test    ruff, mypy --strict and the whole test suite
# Anything else is passed to the powerbox CLI inside the project's environment.
set -euo pipefail
cd "$(dirname "$0")"

venv=.venv
stamp="$venv/.lock-installed"

need_system_packages() {
    local missing=()
    command -v dbus-daemon >/dev/null 2>&1 || [ -x /usr/bin/dbus-daemon ] || missing+=(dbus)
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
    if [ ${#missing[@]} -gt 0 ]; then
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        echo "installing system packages: ${missing[*]}" >&2
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

bootstrap() {
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    local want
    want=$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        "$venv/bin/python" -m pip install -q --disable-pip-version-check --require-hashes -r requirements.lock
        "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
        echo "$want" > "$stamp"
    fi
}

command=${1:-demo}
shift || true
case "$command" in
    test)
        need_system_packages
        bootstrap
        "$venv/bin/ruff" check .
        "$venv/bin/mypy"
        "$venv/bin/python" -m pytest -q "$@"
        ;;
    demo)
        need_system_packages
        bootstrap
        exec "$venv/bin/powerbox" demo "$@"
        ;;
    *)
        bootstrap
        exec "$venv/bin/powerbox" "$command" "$@"
        ;;
esac
