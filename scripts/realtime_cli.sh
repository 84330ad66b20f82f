#!/usr/bin/env bash
# Real-time CLI: play a video into the STAR memory at video_fps x play_speed and ask questions at
# any moment while it plays (answers stream token by token; /quit or Ctrl-D ends).
# Published arguments below; anything after `bash scripts/realtime_cli.sh` is passed through and
# overrides them, e.g.
#   bash scripts/realtime_cli.sh --questions q.jsonl --output answers.jsonl   # scripted mode
#   bash scripts/realtime_cli.sh --video-source 0                            # webcam (or rtsp://...)
#   bash scripts/realtime_cli.sh --play_speed 4 --memory-plot memory.png
# Environment: MODEL_PATH (default: the stage-2 output of scripts/train_and_eval.sh),
#   VIDEO_FILE (default assets/example.mp4), DEVICE (default: cuda when available), PYTHON.
# --log-file realtime_cli.log is JSON Lines: progress events and, last, a per-role latency summary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODEL_PATH=${MODEL_PATH:-checkpoints-finetune/${RUN_NAME:-vstream-vicuna-7b}-finetune}
VIDEO_FILE=${VIDEO_FILE:-assets/example.mp4}
PYTHON=${PYTHON:-python}

if [ ! -d "$MODEL_PATH" ]; then
    echo "error: no model at $MODEL_PATH; train one (scripts/train_and_eval.sh) or set MODEL_PATH" \
         "(e.g. MODEL_PATH=checkpoints-finetune/Flash-VStream-7b for the released weights)" >&2
    exit 2
fi

# a --video-file or --video-source among the extra arguments replaces the default video
source_args=(--video-file "$VIDEO_FILE")
for arg in "$@"; do
    case "$arg" in
        --video-file|--video-file=*|--video-source|--video-source=*) source_args=() ;;
    esac
done
if [ ${#source_args[@]} -gt 0 ] && [ ! -e "$VIDEO_FILE" ]; then
    echo "error: no video at $VIDEO_FILE; set VIDEO_FILE=path/to/video.mp4 or pass --video-file / --video-source" >&2
    exit 2
fi
device_args=()
if [ -n "${DEVICE:-}" ]; then
    device_args=(--device "$DEVICE")
fi

exec "$PYTHON" -m flash_vstream.serve.cli_video_stream \
    --model-path "$MODEL_PATH" \
    "${source_args[@]}" \
    --conv-mode vicuna_v1 \
    --temperature 0.0 \
    --max-new-tokens 512 \
    --video_fps 1.0 \
    --play_speed 1.0 \
    --log-file realtime_cli.log \
    "${device_args[@]}" \
    "$@"
