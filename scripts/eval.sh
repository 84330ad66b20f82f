#!/usr/bin/env bash
# Evaluate a model on the eight video QA benchmarks of the published script: for each, sharded
# inference (one process per GPU), merge, scoring; then one table of all of them.
#   MODEL_PATH=checkpoints-finetune/Flash-VStream-7b JUDGE=exact bash scripts/eval.sh
# Environment (all optional):
#   MODEL_PATH      default: the stage-2 output of scripts/train_and_eval.sh
#   DATA_ROOT       data folder holding eval_video/ (default: data)
#   DATASETS        space-separated subset of the eight names below (default: all)
#   GPUS            comma-separated GPU ids, one inference process each (default: all visible)
#   NUM_CHUNKS      inference processes (default: one per GPU; 1 on CPU)
#   JUDGE           gpt (default: Video-ChatGPT judge) | exact (normalised exact match, no key)
#                   | mcq | none
#   JUDGE_MODEL     default gpt-3.5-turbo-0125; JUDGE_BASE_URL: any OpenAI-compatible server;
#   OPENAI_API_KEY  read by the judge from the environment, never put on a command line
#   MAX_NEW_TOKENS  default 1024 (as published); BATCH_SIZE default 1; DEVICE cpu|cuda
#   OUTPUT_ROOT     default: $MODEL_PATH/evaluation (one folder per dataset)
#   PYTHON          default: python
# Extra arguments go to every `python -m flash_vstream.eval_video.run_eval` call.
# A dataset whose files are absent is skipped with a message. Exit code: non-zero when a present
# dataset failed or when no dataset was found.
set -uo pipefail  # no -e: one failed dataset must not stop the others
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODEL_PATH=${MODEL_PATH:-checkpoints-finetune/${RUN_NAME:-vstream-vicuna-7b}-finetune}
DATA_ROOT=${DATA_ROOT:-data}
DATASETS=${DATASETS:-actnet nextoe msvd msrvtt vsmovienet vsego4d realtime_vsmovienet realtime_vsego4d}
JUDGE=${JUDGE:-gpt}
OUTPUT_ROOT=${OUTPUT_ROOT:-$MODEL_PATH/evaluation}
PYTHON=${PYTHON:-python}

case "$JUDGE" in
    gpt) RESULTS=judge ;;
    exact | mcq) RESULTS=$JUDGE ;;
    none) RESULTS= ;;
    *) echo "error: JUDGE must be gpt, exact, mcq or none (got '$JUDGE')" >&2; exit 2 ;;
esac
if [[ ! -d "$MODEL_PATH" ]]; then
    echo "error: no model at $MODEL_PATH; set MODEL_PATH (e.g. checkpoints-finetune/Flash-VStream-7b)" >&2
    exit 2
fi

args=(--model-path "$MODEL_PATH" --data-root "$DATA_ROOT" --judge "$JUDGE" --skip-absent
      --max-new-tokens "${MAX_NEW_TOKENS:-1024}" --batch-size "${BATCH_SIZE:-1}")
[[ -n "${GPUS:-}" ]] && args+=(--gpus "$GPUS")
[[ -n "${NUM_CHUNKS:-}" ]] && args+=(--num-chunks "$NUM_CHUNKS")
[[ -n "${DEVICE:-}" ]] && args+=(--device "$DEVICE")
[[ -n "${JUDGE_MODEL:-}" ]] && args+=(--judge-model "$JUDGE_MODEL")
[[ -n "${JUDGE_BASE_URL:-}" ]] && args+=(--judge-base-url "$JUDGE_BASE_URL")

dirs=() names=() failed=() skipped=()
for dataset in $DATASETS; do
    echo "=== $dataset ==="
    "$PYTHON" -m flash_vstream.eval_video.run_eval --dataset "$dataset" --output-dir "$OUTPUT_ROOT/$dataset" \
        "${args[@]}" "$@"
    rc=$?
    case $rc in
        0) ;;
        4) skipped+=("$dataset"); continue ;;  # run_eval's "files absent" code; it printed which
        *) echo "error: $dataset failed (exit $rc)" >&2; failed+=("$dataset") ;;
    esac
    dirs+=("$OUTPUT_ROOT/$dataset/$RESULTS") names+=("$dataset")
done

echo "=== all datasets (judge: $JUDGE) ==="
if ((${#skipped[@]})); then echo "skipped (files absent under $DATA_ROOT/eval_video): ${skipped[*]}"; fi
if ((${#names[@]} == 0)); then
    echo "error: no benchmark found under $DATA_ROOT/eval_video (see the README's Structure tree)" >&2
    exit 1
fi
table_rc=0
if [[ -n "$RESULTS" ]]; then
    "$PYTHON" -m flash_vstream.eval_video.aggregate --results-dirs "${dirs[@]}" --names "${names[@]}" \
        --output "$OUTPUT_ROOT/results_$JUDGE.csv" || table_rc=$?
fi
if ((${#failed[@]})); then
    echo "error: failed: ${failed[*]} (rerun to resume; finished items are kept)" >&2
    exit 1
fi
exit "$table_rc"
