#!/usr/bin/env bash
# Many live streams on one GPU in one command: N real WebSocket clients (1-fps JPEG frames of
# assets/example.mp4, a question every 30 s per stream, 64-token answers) against the real server, for
# N = 1, 16, 64, 256, 512, 1024; today's design (one StreamSession per stream, one at a time) and the CLI
# fast path's first token in the same run.
#
#   bash scripts/bench_serve.sh [OUT_DIR] [flags of python -m benchmarks.serve]
#   bash scripts/bench_serve.sh bench_serve                          # 7B-shaped random bf16 weights, one GPU
#   bash scripts/bench_serve.sh bench_serve --model-path ckpt/Flash-VStream-7b
#   bash scripts/bench_serve.sh /tmp/s --preset tiny --device cpu --smoke   # smoke run anywhere
#
# Writes OUT_DIR/serve.json (rewritten after every level) and, with matplotlib, OUT_DIR/serve_latency.png,
# and prints the table. Redraw later with:
#   python -m benchmarks.serve --output OUT_DIR/serve.json --replot --plot OUT_DIR/serve_latency.png
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="bench_serve"
if [[ $# -gt 0 && "$1" != -* ]]; then
  OUT_DIR="$1"
  shift
fi
mkdir -p "$OUT_DIR"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"  # nothing is downloaded: random weights or a local --model-path
PLOT=()
if python -c "import matplotlib" 2>/dev/null; then
  PLOT=(--plot "$OUT_DIR/serve_latency.png")
fi
exec python -m benchmarks.serve --output "$OUT_DIR/serve.json" "${PLOT[@]}" "$@"
