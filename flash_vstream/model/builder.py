"""`load_pretrained_model`: one loader for every checkpoint this project meets.

- a directory written by this project (`config.json` with model_type "vstream", safetensors);
- the released `IVGSZ/Flash-VStream-7b` layout (legacy config keys, `pytorch_model-*.bin` shards
  with an index; `.bin` is read by transformers with `torch.load(weights_only=True)`);
- a stage-1 output (`mm_projector.bin` + config) on top of `model_base` (the LLM);
- a LoRA output (`adapter_config.json`) on top of `model_base`, merged on load.

Dispatch is on the config's `model_type` and on the files present, never on the folder name.
`load_8bit` / `load_4bit` quantize the LLM's linear layers after loading (model/quantization.py): the
checkpoint is read on the CPU and each layer quantized on the target device in turn, so the
full-precision LLM is never on the GPU whole.
"""

import contextlib
import json
import os
import warnings

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from .language_model.configuration_vstream import VStreamConfig
from .language_model.vstream_llama import VStreamLlamaForCausalLM

ADAPTER_FILE = "mm_projector.bin"
NON_LORA_FILE = "non_lora_trainables.bin"  # projector + Semantic Attention beside a LoRA adapter
ADAPTER_PREFIXES = ("model.mm_projector.", "model.attention_model.")


def model_type_of(path):
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path}: no config.json (expected a model directory)")
    with open(config_file) as f:
        return json.load(f).get("model_type")


def load_adapter_weights(model, adapter_path):
    """Load a stage-1 `mm_projector.bin` (projector + Semantic Attention) into `model`."""
    state = torch.load(adapter_path, map_location="cpu", weights_only=True)
    unknown = [k for k in state if not k.startswith(ADAPTER_PREFIXES)]
    if unknown:
        raise ValueError(f"{adapter_path}: unexpected keys {unknown[:4]}")
    own = {k: v for k, v in model.state_dict().items() if k.startswith(ADAPTER_PREFIXES)}
    missing = sorted(set(own) - set(state))
    if any(k.startswith("model.mm_projector.") for k in missing):
        raise ValueError(f"{adapter_path}: missing projector keys {missing}")
    if missing:
        # Adapters written by the published code hold only the projector (its stage-1 save dropped
        # the Semantic Attention); that module then keeps its initial weights.
        warnings.warn(f"{adapter_path}: no weights for {missing}; keeping their initial values")
    params = dict(model.named_parameters())
    with _gathered_for_write([params[k] for k in state if k in params]):
        model.load_state_dict(state, strict=False)
    return model


def _gathered_for_write(params):
    """Under DeepSpeed ZeRO-3 parameters are partitioned: gather them to write, re-partition after."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    from deepspeed import zero

    return zero.GatheredParameters(params, modifier_rank=0)


def _dtype_for(device, torch_dtype):
    """fp32 on the CPU, fp16 on a GPU (as the published loader), unless a dtype is given."""
    if torch_dtype is not None:
        return torch_dtype
    return torch.float32 if str(device).startswith("cpu") else torch.float16


def load_pretrained_model(model_path, model_base=None, model_name=None, load_8bit=False, load_4bit=False,
                          device_map="auto", device="cuda", torch_dtype=None, attn_implementation=None,
                          vision_device=None):
    """Returns `(tokenizer, model, image_processor, context_len)`.

    `model_name` is accepted for compatibility with LLaVA-style callers and not used to choose
    the architecture. `device="cpu"` loads in fp32 on the CPU. `vision_device` (e.g. "cuda:1"): the
    CLIP tower there instead of beside the LLM (the realtime CLI and server check it first:
    runtime/devices.py `vision_placement`).
    `load_8bit` / `load_4bit`: weight-only int8 (per output channel) / int4 (groups of 128) for the LLM's
    projections and LM head, on `device` ("cuda" = the current GPU); the projector, the Semantic Attention
    and CLIP stay in the model's dtype.
    """
    if load_8bit and load_4bit:
        raise ValueError("choose one of load_8bit / load_4bit")
    if vision_device is not None and str(device) == "cuda" and device_map == "auto":
        device = f"cuda:{torch.cuda.current_device()}"  # "auto" would spread the LLM over every visible GPU
    dtype = _dtype_for(device, torch_dtype)
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation or "sdpa"}
    quantize = "int8" if load_8bit else "int4" if load_4bit else None
    if str(device).startswith("cpu") or quantize:
        device_map = None  # quantized: read on the CPU, quantized layer by layer onto `device` below
    elif device_map == "auto" and device != "cuda":
        device_map = {"": device}
    if device_map is not None:
        kwargs["device_map"] = device_map

    is_adapter = os.path.isfile(os.path.join(model_path, ADAPTER_FILE)) and not any(
        f.endswith((".safetensors", ".bin")) and f != ADAPTER_FILE and not f.startswith("training_args")
        for f in os.listdir(model_path))
    is_lora = os.path.isfile(os.path.join(model_path, "adapter_config.json"))
    if (is_adapter or is_lora) and model_base is None:
        raise ValueError(f"{model_path} holds only adapter weights; pass model_base (the LLM it was trained on)")

    if is_lora:
        from peft import PeftModel

        config = VStreamConfig.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_base)
        model = VStreamLlamaForCausalLM.from_pretrained(model_base, config=config, **kwargs)
        extra = os.path.join(model_path, NON_LORA_FILE)
        if os.path.isfile(extra):
            state = torch.load(extra, map_location="cpu", weights_only=True)
            state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
            model.load_state_dict(state, strict=False)
        model = PeftModel.from_pretrained(model, model_path).merge_and_unload()
    elif is_adapter:
        config = VStreamConfig.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_base)
        model = VStreamLlamaForCausalLM.from_pretrained(model_base, config=config, **kwargs)
        load_adapter_weights(model, os.path.join(model_path, ADAPTER_FILE))
    elif model_type_of(model_path) == VStreamConfig.model_type:
        tokenizer = AutoTokenizer.from_pretrained(model_base or model_path)
        model = VStreamLlamaForCausalLM.from_pretrained(model_path, **kwargs)
    else:
        # A plain language model: text only.
        tokenizer = AutoTokenizer.from_pretrained(model_base or model_path)
        model = LlamaForCausalLM.from_pretrained(model_path, **kwargs)

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "right"
    if quantize:
        from .quantization import quantize_model

        quantize_model(model, quantize, device=device)
    elif device_map is None:
        model.to(device)

    image_processor = None
    if isinstance(model, VStreamLlamaForCausalLM):
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        try:
            image_processor = model.get_model().load_vision_tower(
                device=model.device if vision_device is None else vision_device, dtype=dtype).image_processor
        except FileNotFoundError as error:
            # Features-only use (evaluation on pre-extracted .safetensors) still works.
            warnings.warn(f"vision tower not loaded ({error}); only pre-extracted features can be used")
    model.eval()
    context_len = getattr(model.config, "tokenizer_model_max_length", None) or getattr(
        model.config, "max_sequence_length", 2048)
    return tokenizer, model, image_processor, context_len
