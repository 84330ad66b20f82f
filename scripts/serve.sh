#!/usr/bin/env bash
# The streaming server (docs/serving.md): live video sessions, questions at any moment, an OpenAI-compatible
# API and a web page at http://HOST:PORT/.
#   MODEL_PATH=checkpoints-finetune/X bash scripts/serve.sh [more flags]     a trained model
#   bash scripts/serve.sh                                                    the demo's tiny model (built once, CPU)
# Environment: MODEL_PATH, HOST (127.0.0.1), PORT (8000), MEDIA_ROOT (files requests may name; default assets/),
# FLASH_VSTREAM_API_KEY (when set, every endpoint but /health and the page needs it), DEVICE (cuda | cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh serve
if [[ -z "${MODEL_PATH:-}" ]]; then
  MODEL_PATH="${DEMO_MODEL_DIR:-demo_output/serve_model}"
  if [[ ! -f "$MODEL_PATH/config.json" ]]; then
    echo "serve.sh: no MODEL_PATH given; building the demo's tiny (random) model in $MODEL_PATH" >&2
    "$PYTHON" - "$MODEL_PATH" <<'PY'
import os, sys
from flash_vstream.demo.tiny import TINY_CORPUS, build_tiny_clip, build_tiny_vstream, train_tokenizer
out = sys.argv[1]
clip = build_tiny_clip(os.path.join(out, "_clip"))
tokenizer = train_tokenizer(TINY_CORPUS * 20, os.path.join(out, "_tokenizer"), vocab_size=300)
build_tiny_vstream(out, tokenizer, clip)
PY
  fi
  DEVICE="${DEVICE:-cpu}"
fi
args=(--model-path "$MODEL_PATH" --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" --media-root "${MEDIA_ROOT:-assets}")
[[ -n "${DEVICE:-}" ]] && args+=(--device "$DEVICE")
exec "$PYTHON" -m flash_vstream.serve.server "${args[@]}" "$@"
