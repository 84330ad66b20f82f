#!/usr/bin/env bash
# Pre-extract CLIP ViT-L/14 patch features (layer -2, 256 patches x 1024, 1 fps, fp16) for the
# data layout of the README, one process per GPU.
#
#   bash scripts/extract_features.sh [all|eval|pretrain|finetune]      (default: all)
#
#   data/eval_video/<DATASET>/videos  -> data/eval_video/<DATASET>/video_features
#                                        (only the videos named in test_qa.json, when it exists)
#   data/pretrain/videos              -> data/pretrain/video_features
#   data/pretrain/images              -> data/pretrain/image_features
#   data/finetune/activitynet         -> data/finetune/video_features/activitynet
#   data/finetune/{coco,gqa,ocr_vqa,textvqa,vg} -> data/finetune/image_features/<same>
#
# Environment: GPUS (comma list, default: all visible), NUM_CHUNKS (processes: default one per GPU, 1 on
# CPU; more chunks than GPUs share them round robin), VISION_TOWER, FPS, DTYPE, BATCH_SIZE,
# NUM_WORKERS (decoders per process; default: the cores shared out among the processes), DATA (default
# data), DEVICE (cuda, or cpu without GPUs), PYTHON. Missing folders are skipped with a message. Reruns skip finished files. Exit status 1
# when any file failed; the failures are listed in each output folder's extract_report*.json.
set -uo pipefail
cd "$(dirname "$0")/.."

WHAT=${1:-all}
case "$WHAT" in all|eval|pretrain|finetune) ;; *) echo "usage: $0 [all|eval|pretrain|finetune]" >&2; exit 2 ;; esac
VISION_TOWER=${VISION_TOWER:-ckpt/clip-vit-large-patch14}
FPS=${FPS:-1}
DTYPE=${DTYPE:-fp16}
BATCH_SIZE=${BATCH_SIZE:-128}
DATA=${DATA:-data}
PYTHON=${PYTHON:-python}
EVAL_DATASETS=${EVAL_DATASETS:-"ActivityNet-QA MSRVTT-QA MSVD-QA nextoe vstream vstream-realtime"}

if [ -z "${DEVICE:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
fi
if [ "$DEVICE" = cuda ]; then
    if [ -z "${GPUS:-}" ]; then
        GPUS=${CUDA_VISIBLE_DEVICES:-$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)}
    fi
    IFS=, read -ra GPU_LIST <<< "$GPUS"
else
    GPU_LIST=("")  # one CPU process
fi
NUM=${NUM_CHUNKS:-${#GPU_LIST[@]}}
if ! [[ "$NUM" =~ ^[1-9][0-9]*$ ]]; then echo "error: NUM_CHUNKS must be a whole number >= 1, got '$NUM'" >&2; exit 2; fi
# each process would otherwise start one decoder per core: NUM processes would ask for NUM x the cores
NUM_WORKERS=${NUM_WORKERS:-$(( $(nproc) / NUM > 0 ? $(nproc) / NUM : 1 ))}
FAILED=0

# extract INPUT OUTPUT [more flags]: NUM processes (process i on GPU i mod the GPU count), each on its shard of
# the files; every shard writes its own extract_report.chunk{I}of{N}.json
extract() {
    local input=$1 output=$2
    shift 2
    if [ ! -e "$input" ]; then
        echo "skip: $input does not exist"
        return 0
    fi
    echo "== $input -> $output ($NUM process(es), $DEVICE)"
    local pids=() i progress gpu
    for ((i = 0; i < NUM; i++)); do
        progress=()
        [ "$i" -gt 0 ] && progress=(--no-progress)  # one progress bar on the terminal
        gpu=${GPU_LIST[$((i % ${#GPU_LIST[@]}))]}
        CUDA_VISIBLE_DEVICES=${gpu:-${CUDA_VISIBLE_DEVICES:-}} "$PYTHON" -m flash_vstream.extract_features \
            --input "$input" --output "$output" --vision-tower "$VISION_TOWER" \
            --fps "$FPS" --dtype "$DTYPE" --device "$DEVICE" --batch-size "$BATCH_SIZE" \
            --num-workers "$NUM_WORKERS" --num-chunks "$NUM" --chunk-idx "$i" "${progress[@]}" "$@" &
        pids+=($!)
    done
    local status=0 pid
    for pid in "${pids[@]}"; do
        wait "$pid" || status=1
    done
    if [ "$status" -ne 0 ]; then
        echo "some files under $input failed: see $output/extract_report*.json"
        FAILED=1
    fi
}

if [ "$WHAT" = all ] || [ "$WHAT" = eval ]; then
    for dataset in $EVAL_DATASETS; do
        root=$DATA/eval_video/$dataset
        list=()
        [ -f "$root/test_qa.json" ] && list=(--list "$root/test_qa.json")
        extract "$root/videos" "$root/video_features" "${list[@]}"
    done
fi
if [ "$WHAT" = all ] || [ "$WHAT" = pretrain ]; then
    extract "$DATA/pretrain/videos" "$DATA/pretrain/video_features"
    extract "$DATA/pretrain/images" "$DATA/pretrain/image_features"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = finetune ]; then
    extract "$DATA/finetune/activitynet" "$DATA/finetune/video_features/activitynet"
    for images in coco gqa ocr_vqa textvqa vg; do
        extract "$DATA/finetune/$images" "$DATA/finetune/image_features/$images"
    done
fi
exit $FAILED
