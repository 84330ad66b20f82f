#!/usr/bin/env bash
# The embedded demo: generate streams, train a tiny Flash-VStream from nothing with the real
# training code, evaluate it, and run the realtime CLI on a held-out stream. No downloads.
#   DEMO_OUTPUT=demo_output  DEMO_DEVICE=cpu|cuda  DEMO_PRESET=cpu|gpu|quick
# Extra arguments go to `python -m flash_vstream.demo.run_demo`. Rerunning reuses finished steps.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh  # an environment that can run it: the current one, or .venv/ set up once
export TOKENIZERS_PARALLELISM=false
ARGS=(--output "${DEMO_OUTPUT:-demo_output}" --device "${DEMO_DEVICE:-cpu}")
if [[ -n "${DEMO_PRESET:-}" ]]; then ARGS+=(--preset "$DEMO_PRESET"); fi
exec "$PYTHON" -m flash_vstream.demo.run_demo "${ARGS[@]}" "$@"
