#!/usr/bin/env bash
# Streaming benchmarks answered from the live memory: StreamingBench (real-time), OVO-Bench and
# VStream-QA real-time (RVS-Ego, RVS-Movie), each present under $DATA_ROOT/eval_video/, one video played
# once per question set (PROTOCOL=stream) or a clip per question (PROTOCOL=clip, CONTEXT_S for a window).
#   MODEL_PATH=ckpt/Flash-VStream-7b bash scripts/eval_streaming.sh
# Environment (all optional):
#   MODEL_PATH    default: the stage-2 output of scripts/train_and_eval.sh
#   DATA_ROOT     folder holding eval_video/ (default: data)
#   BENCHMARKS    subset of: streamingbench ovobench rvs_ego rvs_movie (default: all present)
#   PROTOCOL      stream (default) | clip;  CONTEXT_S: clip start, seconds before the question
#   GPUS          comma-separated GPU ids, one process (a contiguous chunk of the videos) each
#                 (default: all visible; none: one process)
#   MAX_NEW_TOKENS default 64;  DEVICE cpu|cuda;  OUTPUT_ROOT default $MODEL_PATH/evaluation/streaming_$PROTOCOL
#   PYTHON        default: python
# Extra arguments go to every `python -m flash_vstream.eval_video.streaming` call. A rerun resumes.
# Layout (docs/streaming_benchmarks.md):
#   eval_video/StreamingBench/questions_real.json, videos/          (video_path "./videos/sample_N_real.mp4")
#   eval_video/OVO-Bench/ovo_bench_new.json, src_videos/             (item "video" relative to src_videos/)
#   eval_video/vstream-realtime/test_qa_{ego4d,movienet}.json, {ego4d,movienet}_video_features/ (or videos)
set -uo pipefail  # no -e: one failed benchmark must not stop the others
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODEL_PATH=${MODEL_PATH:-checkpoints-finetune/${RUN_NAME:-vstream-vicuna-7b}-finetune}
DATA_ROOT=${DATA_ROOT:-data}
EVAL=$DATA_ROOT/eval_video
BENCHMARKS=${BENCHMARKS:-streamingbench ovobench rvs_ego rvs_movie}
PROTOCOL=${PROTOCOL:-stream}
OUTPUT_ROOT=${OUTPUT_ROOT:-$MODEL_PATH/evaluation/streaming_$PROTOCOL}
PYTHON=${PYTHON:-python}

if [[ ! -d "$MODEL_PATH" ]]; then
    echo "error: no model at $MODEL_PATH; set MODEL_PATH (e.g. ckpt/Flash-VStream-7b)" >&2
    exit 2
fi
if [[ -z "${GPUS+x}" ]] && command -v nvidia-smi >/dev/null 2>&1; then
    GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, -)
fi
IFS=, read -r -a gpu_list <<< "${GPUS:-}"

common=(--model-path "$MODEL_PATH" --protocol "$PROTOCOL" --max-new-tokens "${MAX_NEW_TOKENS:-64}")
[[ -n "${CONTEXT_S:-}" ]] && common+=(--context-s "$CONTEXT_S")
[[ -n "${DEVICE:-}" ]] && common+=(--device "$DEVICE")

# name -> benchmark, annotation file, video folder
spec() {
    case $1 in
        streamingbench) echo "streamingbench $EVAL/StreamingBench/questions_real.json $EVAL/StreamingBench" ;;
        ovobench) echo "ovobench $EVAL/OVO-Bench/ovo_bench_new.json $EVAL/OVO-Bench/src_videos" ;;
        rvs_ego) echo "vstream $EVAL/vstream-realtime/test_qa_ego4d.json $EVAL/vstream-realtime/ego4d_video_features" ;;
        rvs_movie) echo "vstream $EVAL/vstream-realtime/test_qa_movienet.json $EVAL/vstream-realtime/movienet_video_features" ;;
        *) return 1 ;;
    esac
}

failed=() ran=()
for name in $BENCHMARKS; do
    if ! read -r bench anno videos < <(spec "$name"); then
        echo "error: unknown benchmark '$name' (streamingbench ovobench rvs_ego rvs_movie)" >&2
        failed+=("$name"); continue
    fi
    if [[ ! -f "$anno" || ! -d "$videos" ]]; then
        echo "=== $name: skipped ($anno or $videos absent) ==="
        continue
    fi
    echo "=== $name ==="
    out=$OUTPUT_ROOT/$name
    mkdir -p "$out"
    args=(--benchmark "$bench" --anno "$anno" --video-dir "$videos" --output-dir "$out" "${common[@]}")
    if (( ${#gpu_list[@]} > 1 )); then
        n=${#gpu_list[@]} pids=()
        for i in "${!gpu_list[@]}"; do
            CUDA_VISIBLE_DEVICES=${gpu_list[$i]} "$PYTHON" -m flash_vstream.eval_video.streaming "${args[@]}" \
                --num-chunks "$n" --chunk-idx "$i" "$@" > "$out/chunk_${n}_$i.log" 2>&1 &
            pids+=($!)
        done
        rc=0
        for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
        if (( rc )); then
            echo "error: $name: a chunk failed; see $out/chunk_${n}_*.log" >&2; failed+=("$name"); continue
        fi
        preds=()
        for i in "${!gpu_list[@]}"; do preds+=("$out/predictions_${n}_$i.jsonl"); done
        "$PYTHON" -m flash_vstream.eval_video.streaming --score --benchmark "$bench" --anno "$anno" \
            --pred-file "${preds[@]}" --output-dir "$out" || { failed+=("$name"); continue; }
    else
        [[ ${#gpu_list[@]} -eq 1 ]] && export CUDA_VISIBLE_DEVICES=${gpu_list[0]}
        "$PYTHON" -m flash_vstream.eval_video.streaming "${args[@]}" "$@" || { failed+=("$name"); continue; }
    fi
    ran+=("$name")
done

echo "results: ${ran[*]:-none} (each OUTPUT/results.json under $OUTPUT_ROOT)"
if (( ${#failed[@]} )); then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
(( ${#ran[@]} )) || { echo "error: no benchmark found under $EVAL" >&2; exit 1; }
