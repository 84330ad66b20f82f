"""Training recipe for both stages: parse -> build model -> choose what trains -> data -> Trainer -> save.

Stage 1 (`--tune_mm_mlp_adapter True --version plain`) trains the projector and the Semantic
Attention and writes both to `mm_projector.bin`. Stage 2 (`--version v1`) starts from the LLM
plus that adapter (`--pretrain_mm_mlp_adapter`) and trains everything but the vision tower, or
LoRA adapters with `--lora_enable`.
"""

from dataclasses import dataclass, field, fields

import torch
import transformers
from transformers import AutoTokenizer, CLIPVisionConfig

from ..model import VStreamConfig, VStreamLlamaForCausalLM
from ..model.builder import NON_LORA_FILE, load_adapter_weights, model_type_of
from .checkpointing import resolve_auto, staged_outputs
from .dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset
from .optim_in_backward import check_optim_in_backward
from .packing import DataCollatorForPackedDataset, check_packing
from .vstream_trainer import VStreamTrainer, save_adapter


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "LLM (Vicuna) or Flash-VStream checkpoint folder"})
    version: str = field(default="v1", metadata={"help": "conversation template: plain (stage 1) or v1"})
    vision_tower: str = field(default=None, metadata={"help": "local CLIP ViT-L/14 folder"})
    pretrain_mm_mlp_adapter: str = field(default=None, metadata={"help": "stage-1 mm_projector.bin"})
    freeze_backbone: bool = False
    # Model settings: None keeps the checkpoint's value (or VStreamConfig's released default).
    mm_vision_select_layer: int = None
    mm_vision_select_feature: str = None
    mm_projector_type: str = None
    mm_use_im_start_end: bool = None
    mm_use_im_patch_token: bool = None
    compress_type: str = None
    compress_size: int = None
    compress_long_memory_size: int = None
    compress_Turing_memory_size: int = None
    compress_Turing_hidden_dim: int = None
    compress_Turing_update_ratio: float = None
    video_current_memory_length: int = None
    video_long_memory_length: int = None
    video_Turing_memory_length: int = None
    video_retrieved_memory_length: int = None
    video_buffer_length: int = None
    video_sample_type: str = None
    memory_mode: str = field(default=None, metadata={"help": "paper (default for new models) or upstream"})
    video_max_frames: int = field(default=None, metadata={"help": "accepted for the published scripts; unused"})
    video_short_memory_length: int = field(default=None, metadata={"help": "accepted; unused"})


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "LLaVA-format training JSON"})
    image_folder: str = None
    video_folder: str = None
    use_features: bool = field(default=False, metadata={"help": "read .safetensors CLIP features, not raw media"})
    image_aspect_ratio: str = None
    video_fps: float = None
    skip_bad_samples: bool = field(default=False, metadata={"help": "skip (and count) records with bad media"})
    packing: bool = field(default=False, metadata={
        "help": "pack each batch's samples (memory tokens included) into rows of up to model_max_length, no padding "
                "between them; the attention keeps them apart (see train/packing.py)"})
    memory_build: str = field(default="dataloader", metadata={
        "help": "dataloader: the weight-free part of the STAR memory in the data loader's workers (feature mode), "
                "the Semantic Attention batched in forward; forward: the whole memory per sample in forward (baseline)"})
    lazy_preprocess: bool = field(default=True, metadata={"help": "accepted; data is always read lazily"})
    is_multimodal: bool = field(default=True, metadata={"help": "accepted for the published scripts"})


PARENT_HAS_WARMUP_RATIO = "warmup_ratio" in {f.name for f in fields(transformers.TrainingArguments)}


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = 2048
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "stage 1: train projector + attention only"})
    freeze_mm_mlp_adapter: bool = False
    group_by_modality_length: bool = False
    attn_implementation: str = field(default="sdpa", metadata={
        "help": "sdpa, flash_attention_2, flex_attention, or torch_varlen (PyTorch's varlen kernel, --packing only)"})
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: str = "none"
    optim: str = "adamw_torch"
    remove_unused_columns: bool = False
    warmup_ratio: float = field(default=0.0, metadata={"help": "warmup as a fraction of the total steps"})
    trained_weights_fp32: bool = field(default=False, metadata={
        "help": "keep the trained weights (and so their grads and Adam states) in fp32 under --bf16/--fp16 autocast: "
                "mixed precision without DeepSpeed; frozen weights stay in the compute dtype"})
    compile_decoder_layers: bool = field(default=False, metadata={"help": "torch.compile each LLaMA decoder layer"})
    optim_in_backward: bool = field(default=False, metadata={
        "help": "AdamW applied to each weight inside the backward pass, its gradient dropped at once (no gradient "
                "buffer); bf16 weights with fp32 masters in the optimizer state. One process, no DeepSpeed, "
                "--max_grad_norm 0, no gradient accumulation (see train/optim_in_backward.py)"})

    def __post_init__(self):
        # transformers >= 5.20 folded --warmup_ratio into a fractional --warmup_steps.
        if self.warmup_ratio and not self.warmup_steps and not PARENT_HAS_WARMUP_RATIO:
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()


CONFIG_FIELDS = [f.name for f in fields(ModelArguments)
                 if f.name.startswith(("mm_", "compress_", "video_")) and f.name not in (
                     "video_max_frames", "video_short_memory_length")] + ["memory_mode"]


def parse_args(argv=None):
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def init_deepspeed_comm(training_args):
    """Several CPU processes under DeepSpeed: accelerate sets up torch.distributed (gloo) but not
    deepspeed.comm, so ZeRO-3's `zero.Init` inside `from_pretrained` would count a world of 1 and refuse
    the batch sizes. On GPUs accelerate initialises it itself and this does nothing."""
    if not training_args.deepspeed or training_args.world_size < 2:
        return
    from deepspeed import comm

    if not comm.is_initialized():
        comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def build_config(model_args, data_args, training_args):
    """The checkpoint's config with the memory and vision settings of this run applied."""
    config = VStreamConfig.from_pretrained(model_args.model_name_or_path)
    if model_type_of(model_args.model_name_or_path) != VStreamConfig.model_type:
        config.memory_mode = "paper"  # a plain LLM: this project's memory unless asked otherwise
    for name in CONFIG_FIELDS:
        value = getattr(model_args, name)
        if value is not None:
            setattr(config, name, value)
    for name in ("image_aspect_ratio", "video_fps"):
        value = getattr(data_args, name)
        if value is not None:
            setattr(config, name, value)
    if model_args.vision_tower is not None:
        config.mm_vision_tower = model_args.vision_tower
        config.mm_hidden_size = CLIPVisionConfig.from_pretrained(model_args.vision_tower).hidden_size
    if config.mm_vision_tower is None:
        raise ValueError("--vision_tower is required when the checkpoint names none")
    config.tokenizer_model_max_length = training_args.model_max_length
    config.use_cache = False
    config.validate_vstream()
    return config


def set_trainable(model, model_args, training_args):
    """Stage 1: projector + attention only. Stage 2: all but the vision tower (or LoRA)."""
    inner = model.get_model()
    if training_args.tune_mm_mlp_adapter or model_args.freeze_backbone:
        model.requires_grad_(False)
    else:
        model.requires_grad_(True)
    adapter_trains = training_args.tune_mm_mlp_adapter or not training_args.freeze_mm_mlp_adapter
    inner.mm_projector.requires_grad_(adapter_trains)
    inner.attention_model.requires_grad_(adapter_trains)
    if inner.vision_tower is not None:
        inner.vision_tower.requires_grad_(False)


def apply_lora(model, training_args):
    from peft import LoraConfig, get_peft_model

    skip = ("mm_projector", "attention_model", "vision_tower", "lm_head")
    targets = sorted({name.split(".")[-1] for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip)})
    lora = LoraConfig(r=training_args.lora_r, lora_alpha=training_args.lora_alpha, target_modules=targets,
                      lora_dropout=training_args.lora_dropout, bias=training_args.lora_bias, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    inner = model.get_base_model().get_model()
    inner.mm_projector.requires_grad_(not training_args.freeze_mm_mlp_adapter)
    inner.attention_model.requires_grad_(not training_args.freeze_mm_mlp_adapter)
    return model


def build_model(model_args, data_args, training_args):
    config = build_config(model_args, data_args, training_args)
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    model = VStreamLlamaForCausalLM.from_pretrained(
        model_args.model_name_or_path, config=config, dtype=dtype,
        attn_implementation=training_args.attn_implementation)
    tower = model.get_model().load_vision_tower(device=training_args.device, dtype=dtype)
    if model_args.pretrain_mm_mlp_adapter:
        load_adapter_weights(model, model_args.pretrain_mm_mlp_adapter)
    set_trainable(model, model_args, training_args)
    if training_args.trained_weights_fp32:
        keep_trained_weights_fp32(model)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    if training_args.compile_decoder_layers:
        for layer in model.get_model().layers:
            # One graph serves every layer (parameters are graph inputs, not constants), dynamic in the lengths from the
            # first call: a static one was compiled again for new padded lengths, seconds each, steps into a run.
            layer.compile(dynamic=True)
    if training_args.lora_enable:
        model = apply_lora(model, training_args)
    return model, tower


def keep_trained_weights_fp32(model):
    """fp32 master weights for what trains: the HF Trainer then runs the forward under autocast, and the
    grads and AdamW states of those weights are fp32 too (bf16 weights would lose lr-sized updates)."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def build_tokenizer(model_args, training_args):
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, model_max_length=training_args.model_max_length)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def save_outputs(trainer, model, tokenizer, config, training_args):
    """Stage 1: mm_projector.bin + config. LoRA: adapter + non-LoRA trainables. Else: full model.

    Written into a staging folder and moved into output_dir one rename per file: a kill leaves
    each file whole or absent (a restart with `--resume_from_checkpoint auto` writes them again).
    """
    main = training_args.should_save
    with staged_outputs(training_args.output_dir, main) as out:
        if training_args.tune_mm_mlp_adapter:
            save_adapter(model, out, main)
            if main:
                config.save_pretrained(out)
        elif training_args.lora_enable:
            base = model.get_base_model()
            save_adapter(model, out, main, filename=NON_LORA_FILE)
            if main:
                model.save_pretrained(out)
                base.config.save_pretrained(out)
                tokenizer.save_pretrained(out)
        else:
            trainer.save_model(out)
            if main:
                tokenizer.save_pretrained(out)


def build_collator(data_args, training_args, tokenizer):
    if data_args.packing:
        return DataCollatorForPackedDataset(tokenizer.pad_token_id, max_length=training_args.model_max_length)
    return DataCollatorForSupervisedDataset(tokenizer.pad_token_id)


def train(argv=None, callbacks=None):
    """Run one stage from command-line flags; `callbacks`: extra `TrainerCallback`s (benchmarks, logging)."""
    model_args, data_args, training_args = parse_args(argv)
    check_packing(data_args.packing, training_args.attn_implementation)
    check_optim_in_backward(training_args)
    init_deepspeed_comm(training_args)
    # Seeded before the build: weights the checkpoint lacks (a stage-1 adapter, LoRA) start from --seed,
    # so a run and its rerun (or a killed run and the reference it must match) start alike.
    transformers.set_seed(training_args.seed)
    model, tower = build_model(model_args, data_args, training_args)
    config = (model.get_base_model() if training_args.lora_enable else model).config
    tokenizer = build_tokenizer(model_args, training_args)
    dataset = LazySupervisedDataset(
        data_args.data_path, tokenizer, config, model_args.version, image_folder=data_args.image_folder,
        video_folder=data_args.video_folder, use_features=data_args.use_features,
        image_processor=tower.image_processor, image_aspect_ratio=config.image_aspect_ratio,
        video_fps=config.video_fps, model_max_length=training_args.model_max_length,
        skip_bad_samples=data_args.skip_bad_samples, memory_build=data_args.memory_build,
        memory_dtype=(model.get_base_model() if training_args.lora_enable else model).get_model().mm_projector_dtype())
    trainer = VStreamTrainer(model=model, args=training_args, train_dataset=dataset,
                             data_collator=build_collator(data_args, training_args, tokenizer),
                             callbacks=callbacks)
    resume = training_args.resume_from_checkpoint
    if resume == "auto":  # the newest complete checkpoint-N of output_dir, if any (incomplete ones: skipped, removed)
        resume = resolve_auto(training_args.output_dir, clean=training_args.should_save)
    trainer.train(resume_from_checkpoint=resume)
    config.use_cache = True
    save_outputs(trainer, model, tokenizer, config, training_args)
    return trainer


def finish_distributed():
    """Every rank leaves together, after rank 0's save: a rank that exits while another still uses the group
    (its store lives on node 0) can die in the communication library's teardown with a nonzero status."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    train()
    finish_distributed()
