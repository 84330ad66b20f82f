#!/usr/bin/env bash
# Stage 1 (alignment) -> stage 2 (instruction tuning) -> all evaluations, with DeepSpeed.
# The hyperparameters are the paper's (Table 7). Everything below is overridable from the environment:
#   NUM_GPUS=8 GPU_IDS=0,1,..  HOSTFILE=path (multi-node, one "host slots=N" line per node: NUM_NODES and
#   NUM_GPUS are then its host count and slots; the DeepSpeed launcher reaches the hosts by ssh, or, with
#   NODE_RANK=0..NUM_NODES-1 MASTER_ADDR=<node 0> [MASTER_PORT=29500], run this script on every node: --no_ssh;
#   HOST_INCLUDE=node0:0,1,2,3@node1:4,5,6,7: DeepSpeed's --include, the same count of GPUs of each host, e.g.
#   two "nodes" on one 8-GPU host; NUM_GPUS is then that count)
#   PRETRAIN_BATCH_PER_GPU=32  FINETUNE_BATCH_PER_GPU=16  (global batches stay 256 / 128:
#   gradient accumulation = global / (per-GPU batch x GPUs x nodes))
#   LLM=ckpt/vicuna-7b-v1.5  VISION_TOWER=ckpt/clip-vit-large-patch14  DATA_ROOT=data
#   USE_FEATURES=True (pre-extracted .safetensors; False reads raw images/videos)
#   PRETRAIN_ZERO=scripts/zero0.json  FINETUNE_ZERO=scripts/zero1.json (zero2/zero3/zero3_offload work too)
#   COMPILE=True (torch.compile of each decoder layer; left off under a ZeRO-3 config, which partitions the
#   layers' weights in module hooks, not tried compiled)
#   RUN_NAME=vstream-vicuna-7b  SKIP_EVAL=1 (train only)  DRY_RUN=1 (print the commands only)
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_GPUS=${NUM_GPUS:-8}
NUM_NODES=${NUM_NODES:-1}
GPU_IDS=${GPU_IDS:-$(seq -s, 0 $((NUM_GPUS - 1)))}
if [[ -n "${HOSTFILE:-}" ]]; then  # multi-node: the nodes and their GPUs are the hostfile's
    if [[ ! -f "$HOSTFILE" ]]; then echo "error: HOSTFILE=$HOSTFILE is not a file" >&2; exit 2; fi
    NUM_NODES=$(awk '$1 !~ /^#/ && NF {n++} END {print n + 0}' "$HOSTFILE")
    SLOTS=$(awk '$1 !~ /^#/ && NF {s = "none"; for (i = 2; i <= NF; i++) if ($i ~ /^slots=[0-9]+$/) s = substr($i, 7);
                                   print s}' "$HOSTFILE" | sort -u)
    if [[ ! "$SLOTS" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: HOSTFILE=$HOSTFILE needs one 'host slots=N' line per node, N the same on every node" \
             "(slots found: ${SLOTS//$'\n'/ })" >&2
        exit 2
    fi
    NUM_GPUS=$SLOTS
    if [[ -n "${HOST_INCLUDE:-}" ]]; then  # host:ids@host:ids, as many ids on every host
        COUNTS=$(tr '@' '\n' <<< "$HOST_INCLUDE" | awk -F: 'NF == 2 && $2 != "" {print split($2, ids, ",")} NF != 2 || $2 == "" {print "none"}' | sort -u)
        if [[ ! "$COUNTS" =~ ^[1-9][0-9]*$ ]]; then
            echo "error: HOST_INCLUDE=$HOST_INCLUDE needs host:ids for every host, as many ids on each" >&2
            exit 2
        fi
        NUM_GPUS=$COUNTS
    fi
fi
PRETRAIN_GLOBAL_BATCH=256
FINETUNE_GLOBAL_BATCH=128
PRETRAIN_BATCH_PER_GPU=${PRETRAIN_BATCH_PER_GPU:-32}
FINETUNE_BATCH_PER_GPU=${FINETUNE_BATCH_PER_GPU:-16}
LLM=${LLM:-ckpt/vicuna-7b-v1.5}
VISION_TOWER=${VISION_TOWER:-ckpt/clip-vit-large-patch14}
DATA_ROOT=${DATA_ROOT:-data}
USE_FEATURES=${USE_FEATURES:-True}
PRETRAIN_ZERO=${PRETRAIN_ZERO:-scripts/zero0.json}
FINETUNE_ZERO=${FINETUNE_ZERO:-scripts/zero1.json}
COMPILE=${COMPILE:-True}
RUN_NAME=${RUN_NAME:-vstream-vicuna-7b}
PRETRAIN_DIR=checkpoints-pretrain/${RUN_NAME}-pretrain
FINETUNE_DIR=checkpoints-finetune/${RUN_NAME}-finetune

accumulation() {  # global batch, per-GPU batch -> gradient accumulation steps (must divide exactly)
    local per_step=$(($2 * NUM_GPUS * NUM_NODES))
    if (($1 % per_step)); then
        echo "global batch $1 is not a multiple of $2 x $NUM_GPUS GPUs x $NUM_NODES nodes" >&2
        exit 2
    fi
    echo $(($1 / per_step))
}

PRETRAIN_ACCUMULATION=$(accumulation $PRETRAIN_GLOBAL_BATCH "$PRETRAIN_BATCH_PER_GPU")
FINETUNE_ACCUMULATION=$(accumulation $FINETUNE_GLOBAL_BATCH "$FINETUNE_BATCH_PER_GPU")

run() {
    if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

folders() {  # stage root -> image/video folder flags (features or raw media)
    if [[ "$USE_FEATURES" == "True" ]]; then
        echo "--image_folder $1/image_features --video_folder $1/video_features"
    else
        echo "--image_folder $1/images --video_folder $1/videos"
    fi
}

compile_flag() {  # DeepSpeed config -> --compile_decoder_layers value
    if grep -Eq '"stage": *3' "$1"; then echo False; else echo "$COMPILE"; fi
}

if [[ -n "${HOSTFILE:-}" ]]; then
    LAUNCH=(deepspeed --hostfile "$HOSTFILE")
    if [[ -n "${HOST_INCLUDE:-}" ]]; then LAUNCH+=(--include "$HOST_INCLUDE"); fi
    if [[ -n "${NODE_RANK:-}" ]]; then  # no ssh between the nodes: this node's processes; node 0 holds the rendezvous
        LAUNCH+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "${MASTER_ADDR:?NODE_RANK needs MASTER_ADDR (node 0)}"
                 --master_port "${MASTER_PORT:-29500}")
    fi
else
    LAUNCH=(deepspeed --include "localhost:$GPU_IDS")
fi

# Memory and vision settings: the released config's values, identical in both stages.
MEMORY_FLAGS=(
    --vision_tower "$VISION_TOWER" --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2
    --mm_vision_select_feature patch --mm_use_im_start_end False --mm_use_im_patch_token False
    --compress_type mean --compress_size 8 --compress_long_memory_size 4 --compress_Turing_memory_size 1
    --compress_Turing_hidden_dim 32 --compress_Turing_update_ratio 0.2
    --video_current_memory_length 1 --video_long_memory_length 25 --video_Turing_memory_length 25
    --video_retrieved_memory_length 3 --video_buffer_length 300 --video_sample_type weighted_kmeans
    --video_fps 1 --memory_mode paper --use_features "$USE_FEATURES" --image_aspect_ratio pad
)
COMMON_FLAGS=(
    --bf16 True --num_train_epochs 1 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine
    --optim adamw_torch --logging_steps 1 --model_max_length 2048 --gradient_checkpointing True
    --dataloader_num_workers 4 --lazy_preprocess True --group_by_modality_length True --packing True
    --save_strategy steps --save_steps 100 --save_total_limit 10 --report_to none
    --resume_from_checkpoint auto
)

# shellcheck disable=SC2046
run "${LAUNCH[@]}" flash_vstream/train/train_mem.py \
    --deepspeed "$PRETRAIN_ZERO" \
    --model_name_or_path "$LLM" --version plain \
    --data_path "$DATA_ROOT/pretrain/llava_558k_with_webvid.json" $(folders "$DATA_ROOT/pretrain") \
    --tune_mm_mlp_adapter True --compile_decoder_layers "$(compile_flag "$PRETRAIN_ZERO")" \
    --per_device_train_batch_size "$PRETRAIN_BATCH_PER_GPU" \
    --gradient_accumulation_steps "$PRETRAIN_ACCUMULATION" \
    --learning_rate 1e-3 --output_dir "$PRETRAIN_DIR" \
    "${MEMORY_FLAGS[@]}" "${COMMON_FLAGS[@]}"

# shellcheck disable=SC2046
run "${LAUNCH[@]}" flash_vstream/train/train_mem.py \
    --deepspeed "$FINETUNE_ZERO" \
    --model_name_or_path "$LLM" --version v1 \
    --pretrain_mm_mlp_adapter "$PRETRAIN_DIR/mm_projector.bin" --compile_decoder_layers "$(compile_flag "$FINETUNE_ZERO")" \
    --data_path "$DATA_ROOT/finetune/llava_v1_5_mix665k_with_video_chatgpt.json" $(folders "$DATA_ROOT/finetune") \
    --per_device_train_batch_size "$FINETUNE_BATCH_PER_GPU" \
    --gradient_accumulation_steps "$FINETUNE_ACCUMULATION" \
    --learning_rate 2e-5 --output_dir "$FINETUNE_DIR" \
    "${MEMORY_FLAGS[@]}" "${COMMON_FLAGS[@]}"

if [[ -z "${SKIP_EVAL:-}" ]]; then
    run env MODEL_PATH="$FINETUNE_DIR" GPUS="$GPU_IDS" bash scripts/eval.sh
fi
