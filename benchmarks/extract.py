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
(d) `--e2e`: in one run over the same files (`--e2e-set`, copies per height: the video itself and
re-encodings of it at other heights, with its keyframe interval): decode rate of one process per height,
decoding's weak scaling over 1..N processes (the CPU time per frame and the workers' wall/CPU ratio say
whether the cores are shared), decode-only sampled frames/s with all cores (the CPU limit), the encoder's
frames/s (compiled on CUDA), saving alone on the same disk, the process path end to end with its GPU busy
fraction, where it waited and the CPU its feeding process took (again with one decoder fewer), and last the
thread path end to end (`--pipeline threads`, eager, the earlier path) on a subset of the files with the
set's mix of heights, sized to take about `--e2e-old-seconds`.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from benchmarks.common import DTYPES, VIT_L14, environment, log, random_clip_tower, repeat_ms
from flash_vstream.extraction.decode import usable_cores
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


def cpu_environment(path):
    """What bounds the decoders: the cores this process may use, the container's CPU quota, the cores
    that are hyperthread siblings, the CPU model, and the free space where outputs go."""
    def read(name):
        try:
            with open(name) as f:
                return f.read().strip()
        except OSError:
            return None

    model = next((line.split(":", 1)[1].strip() for line in (read("/proc/cpuinfo") or "").splitlines()
                  if line.startswith("model name")), None)
    return {"cpu_count": os.cpu_count(), "usable_cores": usable_cores(), "cpu_model": model,
            "cgroup_cpu_max": read("/sys/fs/cgroup/cpu.max"),
            "cpu0_thread_siblings": read("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list"),
            "output_free_gb": round(shutil.disk_usage(path).free / 1e9, 1)}


def make_variant(source, path, height, seconds=20.0):
    """The first `seconds` of `source` re-encoded at `height` (width to the aspect, even), H.264 with its
    keyframe interval kept: the ffmpeg CLI when there is one, else PyAV (same settings)."""
    import subprocess

    import av

    with av.open(source) as c:
        stream = c.streams.video[0]
        rate, gop = stream.average_rate, None
        keys = [float(p.pts * stream.time_base) for p in c.demux(stream) if p.is_keyframe and p.pts is not None]
    if len(keys) > 1:
        gop = max(1, round((keys[1] - keys[0]) * float(rate)))
    gop = gop or round(2 * float(rate))
    if shutil.which("ffmpeg"):
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", source, "-t", str(seconds), "-an",
                        "-vf", f"scale=-2:{height}", "-c:v", "libx264", "-preset", "veryfast", "-g", str(gop), "-keyint_min", str(gop),
                        "-sc_threshold", "0", "-pix_fmt", "yuv420p", path], check=True)
        return {"height": height, "gop": gop, "seconds_of_video": seconds, "encoder": "ffmpeg"}
    with av.open(source) as src, av.open(path, "w") as dst:
        s_in = src.streams.video[0]
        width = 2 * round(s_in.width * height / s_in.height / 2)
        out = dst.add_stream("libx264", rate=rate, options={"g": str(gop), "keyint_min": str(gop),
                                                            "sc_threshold": "0", "preset": "veryfast"})
        out.width, out.height, out.pix_fmt = width, height, "yuv420p"
        for frame in src.decode(s_in):
            if frame.time is not None and frame.time >= seconds:
                break
            for packet in out.encode(frame.reformat(width=width, height=height, format="yuv420p")):
                dst.mux(packet)
        for packet in out.encode():
            dst.mux(packet)
    return {"height": height, "gop": gop, "seconds_of_video": seconds, "encoder": "pyav"}


def e2e_inputs(video, spec, folder):
    """A folder of links for `spec` ("360:192,720:12": copies per height; the source's own height uses the
    file itself, other heights a re-encoded variant of its first 20 s). Returns (relative paths, {height: variant info})."""
    import av

    os.makedirs(folder, exist_ok=True)
    with av.open(video) as c:
        own = c.streams.video[0].height
    paths, variants = [], {}
    for part in spec.split(","):
        height, copies = (int(x) for x in part.split(":"))
        source = os.path.abspath(video)
        if height != own:
            source = os.path.join(os.path.dirname(folder), f"variant_{height}p.mp4")
            t0 = time.perf_counter()
            variants[height] = make_variant(video, source, height)
            variants[height]["encode_s"] = round(time.perf_counter() - t0, 1)
        variants.setdefault(height, {"height": height, "encoder": None})["copies"] = copies
        for i in range(copies):
            name = f"{height}p_{i:04d}.mp4"
            os.symlink(source, os.path.join(folder, name))
            paths.append(name)
    return paths, variants


def proportional(paths, fraction):
    """The first round(n * fraction) files of each height (at least one): a subset of `e2e_inputs`' files with
    the set's mix of resolutions, for a path too slow to run over all of them."""
    by_height = {}
    for name in paths:
        by_height.setdefault(name.split("_", 1)[0], []).append(name)
    return [name for names in by_height.values() for name in names[:max(1, round(len(names) * fraction))]]


def bench_save(folder, shape, dtype, files):
    """Saving alone: `files` feature files of `shape` (T, 256, D) written as the pipeline's savers do
    (save_features: serialised, written, fsynced, renamed; SAVE_THREADS at once) into `folder`, on the disk
    the runs write to. Returns {"files", "frames", "seconds", "frames_per_s", "mb_per_s"}."""
    import concurrent.futures

    from flash_vstream.extraction.pipeline import SAVE_THREADS
    from flash_vstream.features import save_features

    feature = torch.randn(shape).to(dtype)
    os.makedirs(folder, exist_ok=True)
    meta = {"timestamps": [float(t) for t in range(shape[0])], "fps": 1.0}
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(SAVE_THREADS) as savers:
        list(savers.map(lambda i: save_features(os.path.join(folder, f"{i}.safetensors"), feature, meta), range(files)))
    dt = time.perf_counter() - t0
    shutil.rmtree(folder, ignore_errors=True)
    frames = files * shape[0]
    return {"files": files, "frames": frames, "seconds": round(dt, 3), "frames_per_s": round(frames / dt, 1),
            "mb_per_s": round(frames * feature[0].nbytes / dt / 1e6, 1), "threads": SAVE_THREADS}


def bench_nvdec(sources, fps, threads=1):
    """GPU decoding with NVDEC (PyNvVideoCodec, when installed): the 1 fps samples of `sources` decoded to
    RGB on the GPU by `threads` decoders at once (one file each at a time), seeking to each sample's frame
    index. A rate to set beside decode-only with all cores, not yet a pipeline backend: its sample frames are
    the decoder's index for each time, not video_io's PTS rule, and its RGB conversion is NVDEC's. Returns
    {"files", "frames", "seconds", "frames_per_s", "cpu_ms_per_frame", "threads"} or {"error"}."""
    import threading

    import numpy as np

    try:
        import PyNvVideoCodec as nvc
    except Exception as e:  # not installed, or the driver's video libraries are missing
        return {"error": f"{type(e).__name__}: {e}"}
    todo, lock, counts, errors = list(sources), threading.Lock(), [0] * threads, []

    def work(rank):
        while True:
            with lock:
                if not todo:
                    return
                source = todo.pop()
            try:
                decoder = nvc.SimpleDecoder(source, gpu_id=torch.cuda.current_device(), use_device_memory=True,
                                            output_color_type=nvc.OutputColorType.RGB)
                meta = decoder.get_stream_metadata()
                duration = len(decoder) / float(meta.average_fps)
                indices = sorted({decoder.get_index_from_time_in_seconds(float(t))
                                  for t in np.arange(0.0, duration, 1.0 / fps)})
                frames = [torch.from_dlpack(f) for f in decoder.get_batch_frames_by_index(indices)]  # (H, W, 3)
                counts[rank] += len(frames)
            except Exception as e:
                errors.append(f"{source}: {type(e).__name__}: {e}")

    torch.cuda.synchronize()
    cpu, t0 = time.process_time(), time.perf_counter()
    workers = [threading.Thread(target=work, args=(r,)) for r in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu
    frames = sum(counts)
    return {"files": len(sources), "frames": frames, "seconds": round(dt, 3), "frames_per_s": round(frames / dt, 1),
            "cpu_ms_per_frame": round(1e3 * cpu / max(1, frames), 2), "threads": threads, "errors": errors[:3]}


def bench_e2e_compare(video, spec, tower, fps, batch, old_workers, workdir, compile, save, scaling_files=3,
                      old_seconds=25.0, nvdec=False):
    """(d) in one run over the same files (`spec`): how decoding scales with processes, decode-only with all
    cores, the encoder alone, saving alone, the new path end to end (with all cores decoding, and with one
    core left to the feeding process), then the old path end to end on a subset of the same files with the
    same mix of resolutions, sized from a short first run to take about `old_seconds` (its frames/s is what
    is compared); with `nvdec`, last, NVDEC's decode-only rate on an eighth of the files (`bench_nvdec`).
    `save(results)` after each part, so a run cut short keeps what it measured."""
    from flash_vstream.extract_features import FrameEncoder, _plan, extract_paths
    from flash_vstream.extraction.decode import DecoderPool, decode_only
    from flash_vstream.extraction.pipeline import run_pipeline

    src = os.path.join(workdir, "videos_compare")
    paths, variants = e2e_inputs(video, spec, src)
    dtype = "bf16" if tower.dtype == torch.bfloat16 else "fp16" if tower.dtype == torch.float16 else "fp32"
    cores = usable_cores()
    out = {"spec": spec, "files": len(paths), "fps": fps, "batch": batch, "cpu": cpu_environment(workdir),
           "variants": variants}
    log(f"e2e inputs: {len(paths)} files ({spec}); {out['cpu']}")

    def plan(names, name):
        report = {"done": [], "skipped": [], "failed": []}
        return _plan(names, src, os.path.join(workdir, name), tower.hidden_size, tower.num_patches, fps, True,
                     report)

    def by_height(height, n):
        names = [p for p in paths if p.startswith(f"{height}p_")]
        return (names * (n // max(1, len(names)) + 1))[:n]

    # the pools the new path uses (all cores, one core left to this process), forked before the encoder
    # compiles (no compile threads in the children)
    pool = DecoderPool(cores, fps=fps, threads=1)
    out["pool_start_s"] = round(pool.start_s, 3)
    pool_less = DecoderPool(cores - 1, fps=fps, threads=1) if cores > 2 else None
    try:
        # one process per resolution (one FFmpeg thread; and FFmpeg's own threads at the first height)
        out["per_process"] = []
        for height in variants:
            jobs = plan(by_height(height, 2 if height == next(iter(variants)) else 1), "unused")
            for threads in ((1, 0) if height == next(iter(variants)) else (1,)):
                r = decode_only(jobs, fps, num_workers=1, threads=threads)
                r.update(height=height, cpu_ms_per_frame=round(1e3 * r["cpu_s"] / max(1, r["frames"]), 2))
                out["per_process"].append(r)
                log(f"one process, {height}p, {threads or 'auto'} FFmpeg threads: {r['frames_per_s']} frames/s, "
                    f"{r['cpu_ms_per_frame']} ms CPU per frame")
        save(out)
        # weak scaling: n processes, `scaling_files` files each of the first height, started apart from the timing
        first = next(iter(variants))
        out["scaling"] = []
        for n in sorted({1, 2, 4, 8, cores} & set(range(1, cores + 1))):
            with DecoderPool(n, fps=fps, threads=1) as p:
                r = decode_only(plan(by_height(first, n * scaling_files), "unused"), fps, pool=p)
                walls = [s["wall_s"] for s in p.stats()]
            r.update(cpu_ms_per_frame=round(1e3 * r["cpu_s"] / max(1, r["frames"]), 2),
                     worker_wall_over_cpu=round(sum(walls) / max(1e-9, r["cpu_s"]), 2))
            out["scaling"].append(r)
            log(f"{n:3d} processes: {r['frames_per_s']} frames/s, start {r['start_s']} s, "
                f"{r['cpu_ms_per_frame']} ms CPU per frame, wall/CPU {r['worker_wall_over_cpu']}")
        save(out)
        # the earlier measurement's shape: 64 files of the first height, the pool's start counted
        cold = decode_only(plan(by_height(first, 64), "unused"), fps, num_workers=cores)
        cold["frames_per_s_with_start"] = round(cold["frames"] / (cold["seconds"] + cold["start_s"]), 1)
        out["decode_only_short"] = cold
        jobs = plan(paths, "unused")
        out["decode_only"] = decode_only(jobs, fps, pool=pool)
        log(f"decode only, {cores} processes, all files: {out['decode_only']['frames_per_s']} frames/s "
            f"(64 short files with the start counted: {cold['frames_per_s_with_start']})")
        save(out)

        x = torch.randn(batch, 3, tower.config.image_size, tower.config.image_size, device=tower.device,
                        dtype=tower.dtype)
        try:
            t0 = time.perf_counter()
            encoder = FrameEncoder(tower, dtype=dtype, compile=compile)
            with torch.inference_mode():
                encoder.features(x)  # compiles before anything is timed
            out["compile_s"] = round(time.perf_counter() - t0, 1)
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

        frames_per_file = max(1, round(out["decode_only"]["frames"] / max(1, len(paths))))
        out["save_only"] = bench_save(os.path.join(workdir, "save_only"),
                                      (frames_per_file, tower.num_patches, tower.hidden_size), tower.dtype,
                                      files=max(4, min(64, len(paths))))
        log(f"save only ({out['save_only']['threads']} threads, {frames_per_file}-frame files): "
            f"{out['save_only']['frames_per_s']} frames/s, {out['save_only']['mb_per_s']} MB/s")
        save(out)

        metadata = {"extractor_version": "benchmark", "vision_tower": "random", "select_layer": tower.select_layer,
                    "image_aspect_ratio": "pad", "dtype": dtype, "backend": "pyav"}

        def new_path(p, name):
            report = {"done": [], "skipped": [], "failed": []}
            jobs = plan(paths, name)
            t0 = time.perf_counter()
            done, frames, stats = run_pipeline(jobs, encoder, metadata, fps, batch, report, False, p)
            dt = time.perf_counter() - t0
            shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
            return {"pipeline": "processes", "workers": stats["decode_workers"], "frames": frames,
                    "seconds": round(dt, 3), "frames_per_s": round(frames / dt, 1),
                    "frames_per_s_with_pool_start": round(frames / (dt + p.start_s), 1),
                    "failed": len(report["failed"]), "compile": compile,
                    "parent_cpu_ms_per_frame": round(1e3 * stats["parent_cpu_s"] / max(1, frames), 3),
                    "parent_cores": round(stats["parent_cpu_s"] / dt, 2), **stats}

        # a short run first: the pipeline's first batches and the copy paths warm
        run_pipeline(plan(paths[::max(1, len(paths) // 16)], "new_warmup"), encoder, metadata, fps, batch,
                     {"done": [], "skipped": [], "failed": []}, False, pool)
        shutil.rmtree(os.path.join(workdir, "new_warmup"), ignore_errors=True)
        limit = min(out["decode_only"]["frames_per_s"], out["encoder"]["frames_per_s"])
        out["new"] = new_path(pool, "new")
        out["new_over_limit"] = round(out["new"]["frames_per_s"] / limit, 3)
        log(f"new path (processes, {cores} decoders): {out['new']['frames_per_s']} frames/s, "
            f"{out['new_over_limit']:.0%} of min(decode, encoder); the feeding process used "
            f"{out['new']['parent_cores']} cores ({out['new']['parent_cpu_ms_per_frame']} ms CPU per frame); {out['new']}")
        save(out)
        if pool_less is not None:
            out["new_one_core_left"] = new_path(pool_less, "new_less")
            out["new_one_core_left_over_limit"] = round(out["new_one_core_left"]["frames_per_s"] / limit, 3)
            log(f"new path ({cores - 1} decoders): {out['new_one_core_left']['frames_per_s']} frames/s, "
                f"{out['new_one_core_left_over_limit']:.0%} of min(decode, encoder)")
            save(out)
    finally:
        pool.close()
        if pool_less is not None:
            pool_less.close()

    def old_path(names, name):
        t0 = time.perf_counter()
        report = extract_paths(names, src, os.path.join(workdir, name), tower, fps=fps, batch_size=batch,
                               num_workers=old_workers, overwrite=True, progress=False, dtype=dtype,
                               pipeline="threads")
        dt = time.perf_counter() - t0
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
        return {"pipeline": "threads", "workers": old_workers, "files": len(names), "frames": report["frames"],
                "seconds": round(dt, 3), "frames_per_s": round(report["frames"] / dt, 1),
                "failed": len(report["failed"])}

    # the old path is ~10x slower: a short run on 1/16 of the files (each height at least once) gives its
    # rate, then one run on the subset it decodes in about `old_seconds`, with the set's mix of heights
    first_run = old_path(proportional(paths, 1 / 16), "old_first")
    fraction = min(1.0, old_seconds * first_run["frames_per_s"] / max(1, out["decode_only"]["frames"]))
    out["old"] = dict(old_path(proportional(paths, fraction), "old"), fraction_of_files=round(fraction, 3),
                      first_run=first_run)
    out["new_over_old"] = round(out["new"]["frames_per_s"] / out["old"]["frames_per_s"], 2)
    log(f"old path (threads, {out['old']['files']} of {len(paths)} files): {out['old']['frames_per_s']} frames/s; "
        f"the new path is {out['new_over_old']}x")
    save(out)
    if nvdec:  # last: a decoder library that crashes the process loses nothing measured before
        sources = [os.path.join(src, name) for name in proportional(paths, 1 / 8)]
        out["nvdec"] = []
        for n in (1, 4, 8):
            out["nvdec"].append(bench_nvdec(sources, fps, threads=n))
            log(f"NVDEC decode only, {n} decoders, {len(sources)} files: {out['nvdec'][-1]}")
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
    p.add_argument("--e2e", action="store_true",
                   help="(d): decode scaling, decode-only, the encoder, the new and the old path over the same files")
    p.add_argument("--e2e-set", default="360:192,720:12,1080:6",
                   help="(d)'s files: copies per height ('360:192,720:12'); other heights than the video's own "
                        "are re-encoded from it")
    p.add_argument("--e2e-fps", type=float, default=1.0)
    p.add_argument("--e2e-workers", type=int, default=8, help="decoder threads of the old path")
    p.add_argument("--e2e-old-seconds", type=float, default=25.0,
                   help="(d): the old path runs on a subset of the files (the set's mix of heights) sized to take "
                        "about this long")
    p.add_argument("--only-e2e", action="store_true", help="skip (a)-(c)")
    p.add_argument("--e2e-nvdec", action="store_true",
                   help="(d), last: NVDEC decode-only rate with PyNvVideoCodec (CUDA; needs it installed), 1/4/8 decoders")
    p.add_argument("--no-compile", action="store_true", help="(d): the new path's encoder eager")
    args = p.parse_args(argv)

    iters, warmup, repeats = (2, 1, 1) if args.tiny else (args.iters, 3, 3)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    if device.type != "cuda" and not args.tiny:
        print("no CUDA: only decode/preprocess are measured (pass --tiny for a CPU encoder smoke run)")
    results = {"host": {**environment(device), "cpus": os.cpu_count()},
               "video": os.path.abspath(args.video), "tiny": args.tiny, "dtype": str(dtype)}

    if not args.only_e2e:
        print(f"decode {args.video}")
        results["decode"] = bench_decode(args.video, args.end, repeats)
        for r in results["decode"]:
            print(f"  {r['backend']:>6} {r['mode']:>6}: {r['frames']:5d} frames, {r['frames_per_s']:8.1f} frames/s "
                  f"({r['source_frames_per_s']:.1f} source frames/s)")

    with tempfile.TemporaryDirectory() as workdir:
        if device.type == "cuda" or args.tiny:
            tower = build_tower(args.tiny, dtype, device)
            results["attn_implementation"] = tower.vision_tower.config._attn_implementation
        if (device.type == "cuda" or args.tiny) and not args.only_e2e:
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
        if args.e2e and (device.type == "cuda" or args.tiny):
            def save(part):
                results["e2e_compare"] = part
                os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
                write_json(args.output, results, indent=1)

            bench_e2e_compare(args.video, args.e2e_set, tower, args.e2e_fps, 8 if args.tiny else 64,
                              args.e2e_workers, workdir, device.type == "cuda" and not args.no_compile, save,
                              scaling_files=1 if args.tiny else 3, old_seconds=args.e2e_old_seconds,
                              nvdec=args.e2e_nvdec and device.type == "cuda")

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_json(args.output, results, indent=1)
    if results.get("encoder"):
        best = max(results["encoder"], key=lambda r: r["frames_per_s"])
        print(f"best encoder: {best['frames_per_s']:.1f} frames/s ({best['variant']}, batch {best['batch']}); "
              f"results in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
