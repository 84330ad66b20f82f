"""Benchmark of feature extraction (not a test): CPU decode rate and GPU encoder rate.

    python -m benchmarks.extract --output bench_extract.json            # on a CUDA machine
    python -m benchmarks.extract --tiny --output /tmp/b.json            # CPU smoke run

(a) Decode frames/s of a video (default assets/example.mp4) on the CPU with PyAV (and decord when
installed): every frame at its native rate, and samples at 1 fps.
(b) CPU preprocessing frames/s (pad to square + CLIP resize/normalise, the real processor).
(c) Encoder frames/s through the real CLIPVisionTower forward (layer -2 patch features) for a
CLIP ViT-L/14-shaped CLIPVisionModel with random weights (same FLOPs as the real one), in
bf16/fp16 with SDPA attention, at several batch sizes, eager / channels-last / torch.compile,
plus the latency of one frame. `--tiny` swaps in the tiny test tower and a couple of
iterations so it runs anywhere in seconds.
(d) Optional end to end: `extract_paths` over K copies of the video (`--e2e-copies K`).
(e) `--e2e`: in one run over the same K copies (default 64): decode-only sampled frames/s in decoder
processes on all cores (the CPU limit), the thread path end to end (`--pipeline threads`, eager, as
before), the encoder's frames/s on the process path's (compiled on CUDA) encoder, and the process path
end to end (`--pipeline processes`) with its GPU busy fraction.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from benchmarks.common import DTYPES, VIT_L14, environment, log, random_clip_tower, repeat_ms
from flash_vstream.mm_utils import process_images
from flash_vstream.utils.files import write_json
from flash_vstream.video_io import iter_frames

DEFAULT_VIDEO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "example.mp4")


def bench_decode(video, end, repeats):
    """Frames/s of decoding `video` (best of `repeats`): native rate and 1 fps, per backend."""
    backends = ["pyav"]
    try:
        from flash_vstream.video_io import _import_decord
        _import_decord()
        backends.append("decord")
    except ImportError:
        pass
    rows = []
    for backend in backends:
        native = None
        for mode, fps in (("native", None), ("1fps", 1.0)):
            best = None
            for _ in range(repeats):
                t0 = time.perf_counter()
                n = sum(1 for _ in iter_frames(video, fps=fps, backend=backend, end=end))
                dt = time.perf_counter() - t0
                best = dt if best is None else min(best, dt)
            if mode == "native":
                native = n
            rows.append({"backend": backend, "mode": mode, "frames": n, "seconds": round(best, 4),
                         "frames_per_s": round(n / best, 1),
                         # source seconds covered per second, as frames of the native rate (at 1 fps the
                         # sparse decoder skips what no sample shows)
                         "source_frames_per_s": round(native / best, 1)})
    return rows


def bench_preprocess(video, image_processor, batch, repeats):
    frames = [f for f, _ in iter_frames(video, fps=None, end=batch / 20.0)][:batch]
    while len(frames) < batch:
        frames = frames + frames
    frames = frames[:batch]
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        process_images(frames, image_processor, "pad")
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return {"frames": batch, "frame_size": list(frames[0].shape), "seconds": round(best, 4),
            "frames_per_s": round(batch / best, 1), "processor": type(image_processor).__name__}


def build_tower(tiny, dtype, device):
    """The stock CLIPVisionTower over random weights: ViT-L/14-shaped, or the demo's tiny tower."""
    from transformers import CLIPVisionConfig

    from flash_vstream.demo.tiny import tiny_clip_config

    return random_clip_tower(tiny_clip_config() if tiny else CLIPVisionConfig(**VIT_L14), device, dtype)


def _timed(fn, x, iters, warmup, device):
    """Median seconds of fn(x) over `iters` runs after `warmup` (wall clock, the device synchronised)."""
    return statistics.median(repeat_ms(device, lambda i: fn(x), iters, warmup)) / 1e3


def bench_encoder(tower, batch_sizes, variants, iters, warmup):
    device, dtype = tower.device, tower.dtype
    size = tower.config.image_size
    layers = tower.config.num_hidden_layers
    tokens = (size // tower.config.patch_size) ** 2 + 1
    d, inter = tower.config.hidden_size, tower.config.intermediate_size
    # matmul FLOPs per frame through all layers (the forward runs them all): qkv+out, mlp, attention
    flops_frame = layers * (2 * tokens * (4 * d * d + 2 * d * inter) + 4 * tokens * tokens * d)
    rows = []
    for variant in variants:
        forward = tower.forward
        if "channels_last" in variant:
            tower.vision_tower.to(memory_format=torch.channels_last)
        if "compile" in variant:
            forward = torch.compile(tower.forward)
        for b in batch_sizes:
            x = torch.randn(b, 3, size, size, device=device, dtype=dtype)
            if "channels_last" in variant:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                out = forward(x)
                assert out.shape == (b, tokens - 1, d), out.shape
                sec = _timed(forward, x, iters, warmup + (2 if "compile" in variant else 0), device)
            fps = b / sec
            rows.append({"variant": variant, "batch": b, "ms_per_batch": round(sec * 1000, 3),
                         "frames_per_s": round(fps, 1), "tflops": round(fps * flops_frame / 1e12, 1)})
            print(f"  {variant:>22} batch {b:4d}: {fps:9.1f} frames/s  {rows[-1]['tflops']:6.1f} TFLOP/s", flush=True)
        if "channels_last" in variant:
            tower.vision_tower.to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        x = torch.randn(1, 3, size, size, device=device, dtype=dtype)
        latency = _timed(tower.forward, x, max(iters, 5), warmup, device)
    return rows, {"batch": 1, "ms": round(latency * 1000, 3)}, flops_frame


def bench_e2e(video, copies, tower, fps, batch, workers, workdir):
    from flash_vstream.extract_features import extract_paths

    src = os.path.join(workdir, "videos")
    os.makedirs(src, exist_ok=True)
    for i in range(copies):
        link = os.path.join(src, f"copy{i}.mp4")
        if not os.path.exists(link):
            os.symlink(os.path.abspath(video), link)
    paths = sorted(os.listdir(src))
    t0 = time.perf_counter()
    report = extract_paths(paths, src, os.path.join(workdir, "features"), tower, fps=fps, batch_size=batch,
                           num_workers=workers, overwrite=True, progress=False,
                           dtype="bf16" if tower.dtype == torch.bfloat16 else "fp16")
    dt = time.perf_counter() - t0
    return {"files": copies, "fps": fps, "workers": workers, "frames": report["frames"], "seconds": round(dt, 3),
            "frames_per_s": round(report["frames"] / dt, 1), "failed": len(report["failed"])}


def bench_e2e_compare(video, copies, tower, fps, batch, old_workers, workdir, compile, save):
    """(e): decode-only, old (threads) and new (processes) end to end over the same files; `save(results)`
    after each part so a run cut short keeps what it measured."""
    from flash_vstream.extract_features import FrameEncoder, _plan, extract_paths
    from flash_vstream.extraction.decode import decode_only
    from flash_vstream.extraction.pipeline import run_pipeline

    src = os.path.join(workdir, "videos_compare")
    os.makedirs(src, exist_ok=True)
    for i in range(copies):
        os.symlink(os.path.abspath(video), os.path.join(src, f"copy{i}.mp4"))
    paths = sorted(os.listdir(src))
    dtype = "bf16" if tower.dtype == torch.bfloat16 else "fp16" if tower.dtype == torch.float16 else "fp32"
    out = {"files": copies, "fps": fps, "batch": batch, "cpus": os.cpu_count()}

    def plan(name):
        report = {"done": [], "skipped": [], "failed": []}
        jobs = _plan(paths, src, os.path.join(workdir, name), tower.hidden_size, tower.num_patches, fps, True, report)
        return jobs

    out["decode_only"] = decode_only(plan("unused"), fps)
    log(f"decode only ({out['decode_only']['workers']} processes): {out['decode_only']['frames_per_s']} frames/s")
    save(out)
    t0 = time.perf_counter()
    report = extract_paths(paths, src, os.path.join(workdir, "old"), tower, fps=fps, batch_size=batch,
                           num_workers=old_workers, overwrite=True, progress=False, dtype=dtype, pipeline="threads")
    dt = time.perf_counter() - t0
    out["old"] = {"pipeline": "threads", "workers": old_workers, "frames": report["frames"], "seconds": round(dt, 3),
                  "frames_per_s": round(report["frames"] / dt, 1), "failed": len(report["failed"])}
    log(f"old path (threads): {out['old']['frames_per_s']} frames/s")
    save(out)

    x = torch.randn(batch, 3, tower.config.image_size, tower.config.image_size, device=tower.device,
                    dtype=tower.dtype)
    try:
        encoder = FrameEncoder(tower, dtype=dtype, compile=compile)
        with torch.inference_mode():
            encoder.features(x)  # compiles (regional, dynamic shapes) before anything is timed
    except Exception as e:  # measured eager instead, and said so
        out["compile_error"] = f"{type(e).__name__}: {e}"
        log(f"compiled encoder failed ({out['compile_error']}); eager")
        compile = False
        encoder = FrameEncoder(tower, dtype=dtype, compile=False)
    with torch.inference_mode():
        ms = statistics.median(repeat_ms(tower.device, lambda i: encoder.features(x), 10, 2))
    out["encoder"] = {"compile": compile, "batch": batch, "frames_per_s": round(batch / ms * 1e3, 1)}
    log(f"encoder (compile={compile}): {out['encoder']['frames_per_s']} frames/s")
    save(out)
    metadata = {"extractor_version": "benchmark", "vision_tower": "random", "select_layer": tower.select_layer,
                "image_aspect_ratio": "pad", "dtype": dtype, "backend": "pyav"}
    workers = os.cpu_count() or 1
    warm = plan("new_warmup")  # a short run first: the pipeline's first batches and the page cache warm
    run_pipeline(warm[: max(1, len(warm) // 8)], encoder, metadata, fps, "pyav", batch, None, workers, 1,
                 {"done": [], "skipped": [], "failed": []}, False)
    report = {"done": [], "skipped": [], "failed": []}
    jobs = plan("new")
    t0 = time.perf_counter()
    done, frames, stats = run_pipeline(jobs, encoder, metadata, fps, "pyav", batch, None, workers, 1, report, False)
    dt = time.perf_counter() - t0
    out["new"] = {"pipeline": "processes", "workers": stats["decode_workers"], "frames": frames,
                  "seconds": round(dt, 3), "frames_per_s": round(frames / dt, 1), "failed": len(report["failed"]),
                  "gpu_busy_fraction": stats["gpu_busy_fraction"], "compile": compile}
    limit = min(out["decode_only"]["frames_per_s"], out["encoder"]["frames_per_s"])
    out["new_over_limit"] = round(out["new"]["frames_per_s"] / limit, 3)
    out["new_over_old"] = round(out["new"]["frames_per_s"] / out["old"]["frames_per_s"], 2)
    log(f"new path (processes): {out['new']['frames_per_s']} frames/s, GPU busy {stats['gpu_busy_fraction']}, "
        f"{out['new_over_limit']:.0%} of min(decode, encoder), {out['new_over_old']}x the old path")
    save(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="JSON file for the results")
    p.add_argument("--video", default=DEFAULT_VIDEO)
    p.add_argument("--tiny", action="store_true", help="tiny tower, few iterations (CPU smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch-sizes", default="32,64,128,256")
    p.add_argument("--variants", default="eager,channels_last,compile",
                   help="comma list of eager, channels_last, compile, compile+channels_last")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--end", type=float, default=None, help="decode only this many seconds of the video")
    p.add_argument("--e2e-copies", type=int, default=0, help="also run extract_paths over this many copies")
    p.add_argument("--e2e-fps", type=float, default=1.0)
    p.add_argument("--e2e-workers", type=int, default=8, help="decoder threads of the old path")
    p.add_argument("--e2e", action="store_true",
                   help="(e): decode-only, old and new path end to end over the same files (--e2e-copies, default 64)")
    p.add_argument("--no-compile", action="store_true", help="(e): the new path's encoder eager")
    args = p.parse_args(argv)

    iters, warmup, repeats = (2, 1, 1) if args.tiny else (args.iters, 3, 3)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    if device.type != "cuda" and not args.tiny:
        print("no CUDA: only decode/preprocess are measured (pass --tiny for a CPU encoder smoke run)")
    results = {"host": {**environment(device), "cpus": os.cpu_count()},
               "video": os.path.abspath(args.video), "tiny": args.tiny, "dtype": str(dtype)}

    print(f"decode {args.video}")
    results["decode"] = bench_decode(args.video, args.end, repeats)
    for r in results["decode"]:
        print(f"  {r['backend']:>6} {r['mode']:>6}: {r['frames']:5d} frames, {r['frames_per_s']:8.1f} frames/s "
              f"({r['source_frames_per_s']:.1f} source frames/s)")

    with tempfile.TemporaryDirectory() as workdir:
        if device.type == "cuda" or args.tiny:
            tower = build_tower(args.tiny, dtype, device)
            results["attn_implementation"] = tower.vision_tower.config._attn_implementation
            results["preprocess"] = bench_preprocess(args.video, tower.image_processor, 32 if args.tiny else 128,
                                                     repeats)
            print(f"preprocess (CPU, {results['preprocess']['processor']}): "
                  f"{results['preprocess']['frames_per_s']:.1f} frames/s")
            batch_sizes = [2, 4] if args.tiny else [int(b) for b in args.batch_sizes.split(",")]
            variants = ["eager"] if args.tiny else args.variants.split(",")
            print(f"encoder ({'tiny' if args.tiny else 'CLIP ViT-L/14 random weights'}, {dtype}, "
                  f"attn={results['attn_implementation']}) through CLIPVisionTower.forward")
            rows, latency, flops = bench_encoder(tower, batch_sizes, variants, iters, warmup)
            results.update(encoder=rows, latency_1_frame=latency, gflops_per_frame=round(flops / 1e9, 2))
            print(f"  1-frame latency: {latency['ms']:.2f} ms")
            if args.e2e_copies:
                results["e2e"] = bench_e2e(args.video, args.e2e_copies, tower, args.e2e_fps,
                                           64, args.e2e_workers, workdir)
                print(f"end to end: {results['e2e']}")
            if args.e2e:
                def save(part):
                    results["e2e_compare"] = part
                    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
                    write_json(args.output, results, indent=1)

                bench_e2e_compare(args.video, args.e2e_copies or (4 if args.tiny else 64), tower, args.e2e_fps,
                                  8 if args.tiny else 64, args.e2e_workers, workdir,
                                  device.type == "cuda" and not args.no_compile, save)

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_json(args.output, results, indent=1)
    if results.get("encoder"):
        best = max(results["encoder"], key=lambda r: r["frames_per_s"])
        print(f"best encoder: {best['frames_per_s']:.1f} frames/s ({best['variant']}, batch {best['batch']}); "
              f"results in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
