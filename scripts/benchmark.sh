#!/usr/bin/env bash
# The realtime benchmark in one command: the real-time path on one GPU (CLIP extraction, streaming
# ingest, question -> answer, decode tokens/s, peak memory) beside the stock stack and two baselines.
#
#   bash scripts/benchmark.sh [OUT_DIR] [flags of python -m benchmarks.realtime]
#   bash scripts/benchmark.sh bench_out                              # 7B-shaped random bf16 weights, ~3 min on an H100
#   bash scripts/benchmark.sh bench_out --model-path ckpt/Flash-VStream-7b
#   bash scripts/benchmark.sh /tmp/b --preset tiny --device cpu      # smoke run anywhere
#
# Writes OUT_DIR/bench.json and OUT_DIR/bench.png and prints the table. Without matplotlib on the GPU
# machine, redraw later with: python -m benchmarks.realtime --output-dir OUT_DIR --replot
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="bench_out"
if [[ $# -gt 0 && "$1" != -* ]]; then
  OUT_DIR="$1"
  shift
fi
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"  # nothing is downloaded: random weights or a local --model-path
exec python -m benchmarks.realtime --output-dir "$OUT_DIR" "$@"
