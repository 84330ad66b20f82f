# Sourced by scripts/demo.sh and scripts/test.sh: sets PYTHON to an interpreter that can run the project.
#
#   source scripts/setup_env.sh [EXTRA]      EXTRA: the pip extra the caller needs ("dev" for the tests, "" for the demo)
#
# An interpreter that already imports everything needed (the `python` on PATH, or $PYTHON if set) is used as it is;
# people who manage their own environments lose nothing. Otherwise the project's virtual environment `.venv/` is
# created (or reused) and what is missing is installed into it: the CPU build of PyTorch where there is no CUDA GPU
# (`torch==2.13.0`, as the README's install line), the CUDA build where `nvidia-smi` sees one.
# FLASH_VSTREAM_NO_SETUP=1 skips all of this and uses `python` as it is.

_fv_extra="${1:-}"
_fv_modules="torch transformers accelerate safetensors sentencepiece google.protobuf PIL av numpy tqdm matplotlib"
if [[ "$_fv_extra" == "dev" ]]; then _fv_modules+=" pytest deepspeed peft openai triton fastapi uvicorn websockets prometheus_client requests playwright"; fi
if [[ "$_fv_extra" == "serve" ]]; then _fv_modules+=" fastapi uvicorn websockets prometheus_client"; fi

_fv_ready() {  # does interpreter $1 import every module the caller needs?
  "$1" - "$_fv_modules" >/dev/null 2>&1 <<'PY'
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1].split()) else 1)
PY
}

if [[ "${FLASH_VSTREAM_NO_SETUP:-0}" == "1" ]]; then
  PYTHON="${PYTHON:-python}"
elif [[ -n "${PYTHON:-}" ]] && _fv_ready "$PYTHON"; then
  :
elif command -v python >/dev/null 2>&1 && _fv_ready python; then
  PYTHON=python
else
  _fv_venv="${FLASH_VSTREAM_VENV:-.venv}"
  if [[ ! -x "$_fv_venv/bin/python" ]]; then
    _fv_base="$(command -v python3 || command -v python)" || { echo "setup_env: no python3 on PATH" >&2; return 1; }
    echo "setup_env: creating the project environment $_fv_venv (with $_fv_base)" >&2
    "$_fv_base" -m venv "$_fv_venv" || { echo "setup_env: could not create $_fv_venv (Debian: apt-get install python3-venv)" >&2; return 1; }
  fi
  PYTHON="$_fv_venv/bin/python"
  if ! _fv_ready "$PYTHON"; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then _fv_torch="torch"; else _fv_torch="torch==2.13.0"; fi
    _fv_target="."; [[ -n "$_fv_extra" ]] && _fv_target=".[$_fv_extra]"
    echo "setup_env: installing $_fv_torch and -e \"$_fv_target\" into $_fv_venv (once)" >&2
    DS_BUILD_OPS=0 "$PYTHON" -m pip install -q --disable-pip-version-check "$_fv_torch" -e "$_fv_target" \
      || { echo "setup_env: pip install failed (see above)" >&2; return 1; }
  fi
fi
export PYTHON
unset -f _fv_ready

# The tests also need two system programs: ffmpeg (live RTSP/HLS sources over loopback) and chromium (the web
# page in a real browser). Installed with apt-get where that is possible (root on Debian/Ubuntu), else named.
if [[ "$_fv_extra" == "dev" && "${FLASH_VSTREAM_NO_SETUP:-0}" != "1" ]]; then
  _fv_missing=""
  command -v ffmpeg >/dev/null 2>&1 || _fv_missing+=" ffmpeg"
  command -v chromium >/dev/null 2>&1 || _fv_missing+=" chromium"
  if [[ -n "$_fv_missing" ]]; then
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
      echo "setup_env: installing$_fv_missing (apt-get)" >&2
      { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $_fv_missing; } >&2 \
        || { echo "setup_env: apt-get install$_fv_missing failed" >&2; return 1; }
    else
      echo "setup_env: the server tests need$_fv_missing (Debian: sudo apt-get install$_fv_missing); they fail without" >&2
    fi
  fi
  unset _fv_missing
fi
