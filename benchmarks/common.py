"""What the benchmarks share: timing, the run's environment and random-weight CLIP towers.

Timing is wall clock around a call with the device synchronised before and after: what a user waits
for, launches and host work included. Samples are summarised by `flash_vstream.utils.stats.summary`.
"""

import platform
import time

import torch

from flash_vstream.runtime.cuda_utils import sync

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# CLIP ViT-L/14 at 224 px (openai/clip-vit-large-patch14's vision config)
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


def log(*parts):
    print(*parts, flush=True)


def timed_ms(device, fn, *args, **kwargs):
    """(milliseconds, result) of one call, the device idle before and drained after."""
    sync(device)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    sync(device)
    return 1e3 * (time.perf_counter() - start), result


def repeat_ms(device, fn, iters, warmup=3):
    """Milliseconds of `iters` calls fn(i) after `warmup` untimed ones (i counts from 0 in each phase)."""
    for i in range(warmup):
        fn(i)
    return [timed_ms(device, fn, i)[0] for i in range(iters)]


def reset_peak(device):
    """Start a new peak-memory window (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device):
    """Peak allocated GPU memory since the last `reset_peak`, GB; None off CUDA."""
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None


def environment(device):
    """Versions and the device's description, for a benchmark's JSON."""
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device_type": device.type, "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), capability=f"{props.major}.{props.minor}",
                    total_memory_gb=round(props.total_memory / 1e9, 2), multiprocessors=props.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    sdpa={"flash": torch.backends.cuda.flash_sdp_enabled(),
                          "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                          "cudnn": torch.backends.cuda.cudnn_sdp_enabled()})
    else:
        info.update(device=platform.processor() or "cpu", threads=torch.get_num_threads())
    return info


def random_clip_tower(vision_config, device, dtype, seed=0, select_layer=-2, select_feature="patch"):
    """A `CLIPVisionTower` (the stock forward) over a CLIP with random weights, built in place on `device`.

    `vision_config`: a `CLIPVisionConfig` (e.g. of VIT_L14, or `demo.tiny.tiny_clip_config()`). Built
    directly in `dtype` on the device: never a 7B-class fp32 copy on the host. The tower carries an
    image processor of the config's size, as a loaded one does.
    """
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from flash_vstream.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    torch.manual_seed(seed)
    with torch.device(device):
        clip = CLIPVisionModel._from_config(vision_config, attn_implementation="sdpa", dtype=dtype)
    clip.eval().requires_grad_(False)
    tower = CLIPVisionTower("random-clip", select_layer=select_layer, select_feature=select_feature, delay_load=True)
    size = vision_config.image_size
    tower.image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    tower.vision_tower = clip
    tower.is_loaded = True
    return tower
