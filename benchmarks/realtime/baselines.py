"""The two baselines the realtime benchmark measures beside the STAR-memory path.

(a) Full context: no memory at all -- every frame's 8x8 pooled tokens (64 per frame) go to the LLM,
    so the prompt grows with the stream. We time the prefill (question -> first token, stock
    transformers forward with its default cache; features precomputed, CLIP not counted) at growing
    frame counts until it no longer fits the GPU or exceeds a token cap.
(b) The published real-time design: the frame handler appends each frame's fp16 [64, D] features to
    an unbounded list, and every update hands the whole list to the reader process (a pickled copy
    through a multiprocessing Manager). We time that copy (`pickle.dumps` + `pickle.loads` of the
    list) at each stream length; the buffer is grown directly to each size, not by real updates.
"""

import gc
import pickle
import time

import torch

from benchmarks import common
from benchmarks.common import peak_gb, reset_peak, timed_ms
from flash_vstream.constants import IMAGE_TOKEN_INDEX
from flash_vstream.runtime.cuda_utils import free_memory


def _is_oom(error):
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


@torch.inference_mode()
def _full_context_prefill(model, prompt_ids, frame_tokens):
    """Prompt text around the projected `frame_tokens` (n, D), prefilled; returns the first token.

    The embeddings are concatenated rather than scattered by mask (`embed_with_memory`): a masked
    scatter over 10^5 positions x 4096 builds index tensors larger than the KV cache, which would put
    the out-of-memory point on the splice instead of on the LLM.
    """
    inner = model.get_model()
    at = int((prompt_ids == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
    ids = prompt_ids.to(model.device)
    before, after = inner.embed_tokens(ids[None, :at]), inner.embed_tokens(ids[None, at + 1:])  # (1, *, hidden)
    media = inner.mm_projector(frame_tokens.to(inner.mm_projector_dtype()))[None].to(before.dtype)  # (1, n, hidden)
    embeds = torch.cat([before, media, after], dim=1)  # (1, L, hidden)
    logits = model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).logits  # stock DynamicCache
    return logits[:, -1].argmax(dim=-1)  # (1,)


def full_context(model, prompt_ids, frame_counts, tokens_per_frame, max_tokens, repeats=2, deadline=None,
                 log=common.log):
    """Prefill time and peak memory of the full-context baseline at each frame count (ascending).

    Stops at the first size that runs out of memory; sizes over `max_tokens` are not tried. Returns
    {"rows": [...], "fits_up_to_frames", "first_oom_frames", "notes"}.
    """
    device, dim = model.device, model.config.mm_hidden_size
    dtype = model.get_model().mm_projector_dtype()
    rows, notes = [], []
    fits, oom_at, last = None, None, None  # last: (tokens, seconds) of the largest size that ran
    for frames in sorted(set(int(f) for f in frame_counts)):
        tokens = frames * tokens_per_frame
        row = {"frames": frames, "tokens": tokens}
        rows.append(row)
        if oom_at is not None:
            row["status"] = "not_tried_after_oom"
            continue
        if tokens + len(prompt_ids) > max_tokens:
            row["status"] = "over_token_cap"
            continue
        reps = repeats if tokens <= 50_000 else 1
        if deadline is not None and last is not None:
            # prefill grows at most quadratically with length (attention); skip what cannot finish in time
            estimate = last[1] * (tokens / last[0]) ** 2 * reps
            if time.perf_counter() + estimate > deadline:
                row["status"] = "skipped_time_budget"
                row["estimated_s"] = round(estimate, 1)
                continue
        frame_tokens = None
        try:
            frame_tokens = torch.randn(tokens, dim, device=device, dtype=dtype)  # (frames*64, D) 8x8 per frame
            times = []
            if last is None:  # warm-up once, at a small size
                _full_context_prefill(model, prompt_ids, frame_tokens[: min(tokens, 4096)])
                free_memory(device)
            reset_peak(device)
            for _ in range(reps):
                times.append(timed_ms(device, _full_context_prefill, model, prompt_ids, frame_tokens)[0])
                free_memory(device)
            row["status"] = "ok"
            row["ttft_ms"] = round(sorted(times)[len(times) // 2], 3)
            row["repeats"] = reps
            if device.type == "cuda":
                row["peak_mem_gb"] = peak_gb(device)
            fits, last = frames, (tokens, max(times) / 1e3)
            log(f"  full context {frames:>6} frames ({tokens:>7} tokens): {row['ttft_ms']:.1f} ms")
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if not _is_oom(error):
                raise
            row["status"] = "oom"
            row["error"] = str(error).splitlines()[0][:300]
            oom_at = frames
            log(f"  full context {frames:>6} frames ({tokens:>7} tokens): out of memory")
        finally:
            frame_tokens = None
            free_memory(device)
    if oom_at is None and any(r["status"] != "ok" for r in rows):
        notes.append("some sizes were not tried (token cap or time budget); see each row's status")
    return {"rows": rows, "fits_up_to_frames": fits, "first_oom_frames": oom_at,
            "tokens_per_frame": tokens_per_frame, "max_tokens": max_tokens, "notes": notes}


def _pickled_copy(buffer):
    # what one published update did: the whole list through a Manager, i.e. pickled and unpickled
    return pickle.loads(pickle.dumps(buffer, protocol=pickle.HIGHEST_PROTOCOL))


def upstream_buffer_copy(frame_counts, dim, tokens_per_frame=64, repeats=3, deadline=None, log=common.log):
    """Per-update cost of copying an unbounded fp16 frame list to the reader, at each length.

    The list holds one fp16 (tokens_per_frame, dim) tensor per frame (128 KiB at 64 x 1024), as the
    published frame handler appended them; each update pickled the whole list across processes.
    """
    cpu = torch.device("cpu")
    base = torch.randn(tokens_per_frame, dim).half()
    buffer, rows = [], []
    for frames in sorted(set(int(f) for f in frame_counts)):
        while len(buffer) < frames:
            buffer.append(base.clone().add_(len(buffer) % 7))  # a distinct tensor per frame, not a view
        nbytes = sum(t.nelement() * t.element_size() for t in buffer)
        row = {"frames": frames, "buffer_bytes": nbytes}
        rows.append(row)
        if deadline is not None and time.perf_counter() > deadline:
            row["status"] = "skipped_time_budget"
            continue
        reps = repeats if nbytes < 500e6 else 1
        times = []
        for _ in range(reps):
            ms, copy = timed_ms(cpu, _pickled_copy, buffer)
            times.append(ms)
            del copy  # freed outside the timed call, as the reader kept it
        row.update(status="ok", copy_ms=round(sorted(times)[len(times) // 2], 3), repeats=reps)
        log(f"  upstream buffer {frames:>6} frames ({nbytes / 2**20:8.1f} MiB): copy {row['copy_ms']:.1f} ms/update")
    buffer.clear()
    gc.collect()
    return {"rows": rows, "bytes_per_frame": tokens_per_frame * dim * 2,
            "method": "pickle.dumps + pickle.loads of the list of per-frame fp16 tensors (one update)"}
