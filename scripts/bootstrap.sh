# Sourced by run.sh and test.sh: make sure .venv exists and matches requirements.txt.
# Idempotent and fast when the environment is already there (one checksum comparison).
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="$_root/.venv"
_stamp="$_venv/.requirements.sha256"
_want="$(sha256sum "$_root/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$_venv/bin/python" ] || [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  _py="$(command -v python3.11 || command -v python3)"
  echo "bootstrapping $_venv from requirements.txt with $_py (first run only, a few minutes)" >&2
  "$_py" -m venv "$_venv" || return 1 2>/dev/null || exit 1
  # (this machine's pip configuration may list local package folders that do not exist: drop that noise)
  if ! (set -o pipefail; "$_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
          -r "$_root/requirements.txt" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" >&2 || true; }); then
    echo "error: pip install -r requirements.txt failed (see above)" >&2
    return 1 2>/dev/null || exit 1
  fi
  echo "$_want" > "$_stamp"
fi
PY="$_venv/bin/python"
export PYTHONPATH="$_root${PYTHONPATH:+:$PYTHONPATH}"
