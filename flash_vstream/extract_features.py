"""Extract CLIP patch features of videos (sampled at `fps`) and images into `.safetensors` files.

    python -m flash_vstream.extract_features --input data/eval_video/MSVD-QA/videos \\
        --output data/eval_video/MSVD-QA/video_features --vision-tower ckpt/clip-vit-large-patch14

Each input `<INPUT>/<rel>.<ext>` becomes `<OUTPUT>/<rel>.safetensors` with tensor `feature`
[T, 256, D] for a video (T samples at `fps`) or [256, D] for an image, plus header metadata
(fps, timestamps, source, extractor_version, ...). Resumable: a valid existing output is
skipped; outputs are written under a temporary name and renamed. Shards with
--num-chunks/--chunk-idx or torchrun's RANK/WORLD_SIZE/LOCAL_RANK. Ends with a report
`extract_report.json` (per shard: `extract_report.chunk{I}of{N}.json`) and exit status 1 when
any file failed. `--pipeline processes` (the default on CUDA) decodes in one process per core and
preprocesses on the device (flash_vstream.extraction); `--pipeline threads` decodes in threads and
preprocesses with the CLIP processor on the CPU.

The published repository never shipped this step (it lived in a zip attached to an issue).
"""

import argparse
import collections
import json
import os
import queue
import sys
import threading
import time

import torch

from .extraction.decode import usable_cores
from .features import feature_file_for, save_features, valid_feature_file
from .mm_utils import process_images
from .utils.files import temp_files_for, write_json
from .utils.sharding import check_shard, shard_bounds
from .video_io import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VideoReadError, is_image_path, is_url, is_video_path,
                       iter_frames, load_image)

EXTRACTOR_VERSION = "flash_vstream.extract_features/1"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
REPORT_NAME = "extract_report.json"


# ----------------------------------------------------------------------------- what to extract

def _walk_media(root):
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if is_video_path(name) or is_image_path(name):
                found.append(os.path.relpath(os.path.join(folder, name), root))
    return found


def _list_entries(list_file):
    """Entries of a list file: ("path", p) or ("video_id", id).

    Accepts a text file (one path per line, '#' comments), a benchmark `test_qa.json` (items
    with `video_id`), or a LLaVA training JSON (items with `video` and/or `image`; text-only
    items are skipped).
    """
    with open(list_file) as f:
        text = f.read()
    if not list_file.lower().endswith(".json"):
        return [("path", line.strip()) for line in text.splitlines()
                if line.strip() and not line.strip().startswith("#")]
    data = json.loads(text)
    if isinstance(data, dict):  # {video_id: {...}} or {"data": [...]}
        data = data.get("data", [{"video_id": k} for k in data])
    entries = []
    for item in data:
        if isinstance(item, str):
            entries.append(("path", item))
            continue
        if "video_id" in item:
            entries.append(("video_id", str(item["video_id"])))
        for key in ("video", "image"):
            value = item.get(key)
            for v in (value if isinstance(value, list) else [value] if value else []):
                entries.append(("path", v))
    return entries


def collect_inputs(input_path, list_file=None):
    """(input_root, paths, missing): the media files to extract, relative to `input_root`
    (absolute paths and URLs stay as they are), and list entries with no file as
    [{"file", "error"}]. Order is stable and duplicates are dropped."""
    if is_url(input_path):
        return "", [input_path], []
    if list_file is None:
        if os.path.isfile(input_path):
            return os.path.dirname(input_path), [os.path.basename(input_path)], []
        if os.path.isdir(input_path):
            return input_path, _walk_media(input_path), []
        raise FileNotFoundError(f"--input {input_path}: no such file or folder")
    if not os.path.isdir(input_path):
        raise NotADirectoryError(f"--input {input_path}: with --list, the input must be the media folder")
    by_stem = None
    paths, missing = [], []
    for kind, name in _list_entries(list_file):
        if kind == "video_id":
            if by_stem is None:  # video ids name files without (or with) their extension
                by_stem = {}
                for rel in _walk_media(input_path):
                    if is_video_path(rel):
                        by_stem.setdefault(os.path.splitext(rel)[0], rel)
                        by_stem.setdefault(os.path.splitext(os.path.basename(rel))[0], rel)
            rel = by_stem.get(os.path.splitext(name)[0] if is_video_path(name) else name)
            if rel is None:
                missing.append({"file": os.path.join(input_path, name),
                                "error": f"no video file for video_id {name!r} under {input_path}"})
                continue
            paths.append(rel)
        else:
            paths.append(name)
    return input_path, list(dict.fromkeys(paths)), missing


def resolve_shard(num_chunks=None, chunk_idx=None, environ=os.environ):
    """(num_chunks, chunk_idx, sharded): the flags when given, else torchrun's WORLD_SIZE/RANK."""
    if num_chunks is None and chunk_idx is None:
        num_chunks = int(environ.get("WORLD_SIZE", 1))
        chunk_idx = int(environ.get("RANK", 0))
    elif num_chunks is None or chunk_idx is None:
        raise ValueError("--num-chunks and --chunk-idx go together")
    check_shard(num_chunks, chunk_idx)
    return num_chunks, chunk_idx, num_chunks > 1


def resolve_device(device, environ=os.environ):
    if device == "cuda" and "LOCAL_RANK" in environ:
        return f"cuda:{int(environ['LOCAL_RANK'])}"
    return device


def report_name(num_chunks=1, chunk_idx=0):
    return REPORT_NAME if num_chunks == 1 else f"extract_report.chunk{chunk_idx}of{num_chunks}.json"


# ----------------------------------------------------------------------------- encoder

class FrameEncoder:
    """The frozen CLIP tower: preprocessed frames (B, 3, S, S) -> patch features (B, 256, D).

    On CUDA the tower runs in the requested dtype under inference_mode; on CPU it runs in fp32
    (half-precision matmuls are slow or missing there) and only the output is cast.
    """

    def __init__(self, vision_tower, device="cpu", dtype="fp16", image_aspect_ratio="pad", compile=False):
        from .model.multimodal_encoder.clip_encoder import CLIPVisionTower
        from .runtime.fast_path import FastPath
        from .runtime.options import FastPathOptions

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.out_dtype = DTYPES[dtype]
        if isinstance(vision_tower, CLIPVisionTower):  # already built and placed (the demo's)
            self.tower = vision_tower
        else:
            self.tower = CLIPVisionTower(vision_tower)
            compute = self.out_dtype if torch.device(device).type == "cuda" else torch.float32
            self.tower.vision_tower.to(device=device, dtype=compute).eval()
        self.tower.requires_grad_(False)
        self.name = self.tower.vision_tower_name
        self.image_processor = self.tower.image_processor
        self.image_aspect_ratio = image_aspect_ratio
        self.hidden_size = self.tower.hidden_size
        self.num_patches = self.tower.num_patches
        self.on_cuda = self.tower.device.type == "cuda"
        # the tower's own features, from the fast path's encoder: it stops at the selected layer (bit-exact);
        # with `compile`, batches run its compiled path (q/k/v fused by an announced step, the patch embedding
        # as one product; on CUDA the Triton attention and fc1 kernels). No CUDA graph: batches, not frames.
        options = FastPathOptions(enabled=True, cuda_graph=False, compile_decode=False, fused_weights=False,
                                  compile_vision=bool(compile), pad_suffix=False)
        self.fast_path = FastPath(tower=self.tower, options=options).fuse_weights()
        self._forward = self.fast_path.vision()

    def preprocess(self, frames):
        pixels = process_images(frames, self.image_processor, self.image_aspect_ratio)  # (B, 3, S, S)
        return pixels.pin_memory() if self.on_cuda else pixels

    def features(self, pixels):
        """Pixels (B, 3, S, S) on the tower's device and dtype -> features (B, 256, D) there, output dtype."""
        return self._forward(pixels).to(dtype=self.out_dtype)

    def encode(self, pixels):
        with torch.inference_mode():
            pixels = pixels.to(self.tower.device, dtype=self.tower.dtype, non_blocking=True)
            return self.features(pixels).cpu()  # (B, 256, D)


def _tower_shape(vision_tower):
    """(hidden_size, patches per frame) of a tower or a checkpoint path, from its config alone,
    so a resumed run with nothing left to do never loads the weights."""
    from transformers import CLIPVisionConfig

    from .model.multimodal_encoder.clip_encoder import CLIPVisionTower, resolve_vision_tower_path

    if isinstance(vision_tower, CLIPVisionTower):
        return vision_tower.hidden_size, vision_tower.num_patches
    path = resolve_vision_tower_path(vision_tower)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"vision tower {vision_tower!r} not found (looked at {path!r}); "
                                "put CLIP ViT-L/14 in ckpt/clip-vit-large-patch14 or pass a local path")
    config = CLIPVisionConfig.from_pretrained(path, local_files_only=True)
    return config.hidden_size, (config.image_size // config.patch_size) ** 2


# ----------------------------------------------------------------------------- pipeline


_Job = collections.namedtuple("_Job", "index source output kind")


def _plan(paths, input_root, output_dir, hidden_size, num_patches, fps, overwrite, report):
    """Jobs for the files whose output is missing or invalid; the rest go to report["skipped"]."""
    jobs, outputs_seen = [], {}
    for path in paths:
        source = path if is_url(path) or os.path.isabs(path) else os.path.join(input_root, path)
        if is_url(path):
            rel = os.path.basename(path.split("?")[0]) or "stream"
        elif input_root and not os.path.relpath(source, input_root).startswith(os.pardir):
            rel = os.path.relpath(source, input_root)
        else:
            rel = os.path.basename(source)
        out = feature_file_for(output_dir, rel)
        kind = "image" if is_image_path(source) else "video"
        if out in outputs_seen:
            report["failed"].append({"file": source, "error": f"output {out} also comes from {outputs_seen[out]}"})
            continue
        outputs_seen[out] = source
        if not overwrite and valid_feature_file(out, kind=kind, hidden_size=hidden_size, num_patches=num_patches,
                                                fps=fps):
            report["skipped"].append(source)
            continue
        for stale in temp_files_for(out):  # left by a killed run; shards own disjoint outputs
            os.remove(stale)
        jobs.append(_Job(len(jobs), source, out, kind))
    return jobs


def _decode_worker(jobs, results, encoder, fps, backend, batch_size, end, threads, stop):
    """Decode + preprocess files from `jobs`; put ("batch", job, pixels, times), then ("done",
    job) or ("error", job, message) on `results`. Runs in threads beside the encoder."""

    def put(item):
        while not stop.is_set():
            try:
                results.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    while not stop.is_set():
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            return
        try:
            if job.kind == "image":
                ok = put(("batch", job, encoder.preprocess([load_image(job.source)]), [0.0]))
            else:
                frames, times, ok = [], [], True
                for frame, t in iter_frames(job.source, fps=fps, backend=backend, end=end, threads=threads):
                    frames.append(frame)
                    times.append(t)
                    if len(frames) == batch_size:
                        ok = put(("batch", job, encoder.preprocess(frames), times))
                        frames, times = [], []
                        if not ok:
                            break
                if frames and ok:
                    ok = put(("batch", job, encoder.preprocess(frames), times))
            if ok:
                put(("done", job))
        except VideoReadError as e:  # reported per file; the other files go on
            put(("error", job, str(e)))
        except Exception as e:
            put(("error", job, f"{job.source}: {type(e).__name__}: {e}"))


def _run(jobs, encoder, metadata, fps, backend, batch_size, end, num_workers, decode_threads, report, progress):
    """Decode in `num_workers` threads, encode batches here as they come, save each file when its
    last batch is encoded. Returns (finished jobs, frames encoded)."""
    from tqdm import tqdm

    job_queue = queue.Queue()
    for job in jobs:
        job_queue.put(job)
    results = queue.Queue(maxsize=2 * num_workers)  # bounds the decoded frames held in memory
    stop = threading.Event()
    workers = [threading.Thread(target=_decode_worker, daemon=True, name=f"decode-{i}",
                                args=(job_queue, results, encoder, fps, backend, batch_size, end,
                                      decode_threads, stop))
               for i in range(num_workers)]
    for w in workers:
        w.start()
    partial = {}  # job index -> ([feature chunks], [timestamps]) until the job ends
    failed, done, frames, remaining = set(), [], 0, len(jobs)
    started = time.time()
    bar = tqdm(total=len(jobs), unit="file", desc="extract", disable=not progress, dynamic_ncols=True)
    try:
        while remaining:
            try:
                item = results.get(timeout=1.0)
            except queue.Empty:
                if not any(w.is_alive() for w in workers) and results.empty():
                    raise RuntimeError("decode workers ended with files unaccounted for") from None
                continue
            tag, job = item[0], item[1]
            if tag == "batch":
                if job.index in failed:  # an encode error already ended this file
                    continue
                try:
                    chunk = encoder.encode(item[2])  # (b, 256, D)
                except Exception as e:
                    failed.add(job.index)
                    partial.pop(job.index, None)
                    report["failed"].append({"file": job.source, "error": f"encoding: {type(e).__name__}: {e}"})
                    continue
                chunks, times = partial.setdefault(job.index, ([], []))
                chunks.append(chunk)
                times.extend(item[3])
                frames += len(item[3])
                bar.set_postfix(frames=frames, fps=f"{frames / (time.time() - started):.1f}")
                continue
            remaining -= 1
            bar.update(1)
            chunks, times = partial.pop(job.index, ([], []))
            if job.index in failed:
                continue
            if tag == "error":
                report["failed"].append({"file": job.source, "error": item[2]})
                continue
            try:
                feature = torch.cat(chunks)  # (T, 256, D)
                if job.kind == "image":
                    feature = feature[0]  # (256, D)
                save_features(job.output, feature, dict(
                    metadata, fps=0.0 if job.kind == "image" else fps, timestamps=times, source=job.source,
                    kind=job.kind))
                done.append(job)
            except Exception as e:
                report["failed"].append({"file": job.source, "error": f"saving: {type(e).__name__}: {e}"})
    finally:
        stop.set()
        bar.close()
    return done, frames


def extract_paths(paths, input_root, output_dir, vision_tower, fps=1.0, dtype="fp16", device="cpu",
                  batch_size=64, image_aspect_ratio="pad", backend="pyav", overwrite=False,
                  num_workers=None, decode_threads=None, end=None, compile=False, report_path=None, failed=None,
                  progress=True, pipeline="threads"):
    """Extract features of `paths` (relative to `input_root`, or absolute) into `output_dir`.

    `vision_tower` is a CLIP checkpoint path or a built CLIPVisionTower. Returns the report
    `{"done": [...], "skipped": [...], "failed": [{"file", "error"}], ...}` (sources as read),
    also written to `report_path` when given. `failed` seeds the failures (list entries with
    no file). Video frames are decoded lazily by `num_workers` decoders and encoded in batches
    of `batch_size`, each decoder using `decode_threads` threads (default: the cores shared
    among the workers); `end` (seconds) cuts every video there. The tower is loaded only when
    some file needs extracting. `pipeline`: "threads" (decoder threads, CLIP preprocessing with
    the processor on the CPU; 4 workers by default) or "processes" (flash_vstream.extraction: decoder
    processes, one per core by default, preprocessing batched on the encoder's device).
    """
    if pipeline not in ("threads", "processes"):
        raise ValueError(f"pipeline must be 'threads' or 'processes', got {pipeline!r}")
    started = time.time()
    report = {"done": [], "skipped": [], "failed": list(failed or [])}
    hidden_size, num_patches = _tower_shape(vision_tower)
    jobs = _plan(paths, input_root, output_dir, hidden_size, num_patches, fps, overwrite, report)
    cores = usable_cores()
    if num_workers is None:
        num_workers = cores if pipeline == "processes" else 4
    num_workers = max(1, min(num_workers, len(jobs)))
    if decode_threads is None:  # FFmpeg threads per decoder: the cores shared out, one each when all are busy
        decode_threads = max(1, cores // num_workers)
    tower_name = getattr(vision_tower, "vision_tower_name", vision_tower)
    done, frames, stats = [], 0, {}
    if jobs:
        pool = None
        if pipeline == "processes":
            from .extraction.decode import DecoderPool

            # forked before the encoder is built and before any thread starts; kept for the whole run
            pool = DecoderPool(num_workers, fps=fps, backend=backend, end=end, threads=decode_threads)
        try:
            encoder = FrameEncoder(vision_tower, device=device, dtype=dtype, image_aspect_ratio=image_aspect_ratio,
                                   compile=compile)
            device = str(encoder.tower.device)
            metadata = {"extractor_version": EXTRACTOR_VERSION, "vision_tower": tower_name,
                        "select_layer": encoder.tower.select_layer, "image_aspect_ratio": image_aspect_ratio,
                        "dtype": dtype, "backend": backend}
            if pool is not None:
                from .extraction.pipeline import run_pipeline

                done, frames, stats = run_pipeline(jobs, encoder, metadata, fps, batch_size, report, progress, pool)
                stats["decode_start_s"] = round(pool.start_s, 3)
            else:
                done, frames = _run(jobs, encoder, metadata, fps, backend, batch_size, end, num_workers,
                                    decode_threads, report, progress)
        finally:
            if pool is not None:
                pool.close()
    report["done"] = [job.source for job in sorted(done, key=lambda j: j.index)]
    elapsed = time.time() - started
    report.update(frames=frames, seconds=round(elapsed, 3), frames_per_second=round(frames / elapsed, 2), **stats,
                  settings={"pipeline": pipeline, "fps": fps, "dtype": dtype, "device": str(device), "vision_tower": str(tower_name),
                            "batch_size": batch_size, "backend": backend, "num_workers": num_workers,
                            "decode_threads": decode_threads, "image_aspect_ratio": image_aspect_ratio,
                            "end": end, "extractor_version": EXTRACTOR_VERSION})
    if report_path:
        write_json(report_path, report, indent=1)
    return report


# ----------------------------------------------------------------------------- command line

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a video/image file, a folder (searched recursively) or a URL")
    p.add_argument("--output", required=True, help="output folder; mirrors the input's relative paths")
    p.add_argument("--vision-tower", required=True, help="local CLIP vision checkpoint (ckpt/clip-vit-large-patch14)")
    p.add_argument("--fps", type=float, default=1.0, help="video sampling rate, frames per second (paper: 1)")
    p.add_argument("--end", type=float, default=None, help="stop each video at this time in seconds")
    p.add_argument("--num-chunks", type=int, default=None, help="number of shards (default: $WORLD_SIZE or 1)")
    p.add_argument("--chunk-idx", type=int, default=None, help="this shard (default: $RANK or 0)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="stored dtype (and compute dtype on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (cuda uses $LOCAL_RANK when set)")
    p.add_argument("--batch-size", type=int, default=64, help="frames per encoder batch")
    p.add_argument("--num-workers", type=int, default=None,
                   help="files decoded at once: processes (default one per core) or threads (default 4)")
    p.add_argument("--pipeline", choices=["auto", "processes", "threads"], default="auto",
                   help="processes: decoder processes, preprocessing on the device (auto: on CUDA); "
                        "threads: decoder threads, the processor on the CPU (auto: on CPU)")
    p.add_argument("--decode-threads", type=int, default=None,
                   help="FFmpeg threads per decoder (default: CPU cores / workers)")
    p.add_argument("--list", default=None,
                   help="which files: a text list, a test_qa.json (video_id) or a LLaVA training JSON "
                        "(video/image keys), relative to --input")
    p.add_argument("--image-aspect-ratio", choices=["pad", "square"], default="pad",
                   help="pad: pad to square with the CLIP mean colour (released config); square: as is")
    p.add_argument("--backend", choices=["pyav", "decord"], default="pyav", help="video decoder")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (long runs on GPU)")
    p.add_argument("--overwrite", action="store_true", help="re-extract files whose output is already valid")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    num_chunks, chunk_idx, sharded = resolve_shard(args.num_chunks, args.chunk_idx)
    input_root, paths, missing = collect_inputs(args.input, args.list)
    if not paths and not missing:
        extensions = " ".join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)
        print(f"no video or image files under {args.input} (extensions: {extensions})", file=sys.stderr)
    lo, hi = shard_bounds(len(paths), num_chunks, chunk_idx)
    mlo, mhi = shard_bounds(len(missing), num_chunks, chunk_idx)
    os.makedirs(args.output, exist_ok=True)
    device = resolve_device(args.device)
    pipeline = args.pipeline if args.pipeline != "auto" else (
        "processes" if torch.device(device).type == "cuda" else "threads")
    report_path = os.path.join(args.output, report_name(num_chunks, chunk_idx))
    report = extract_paths(
        paths[lo:hi], input_root, args.output, args.vision_tower, fps=args.fps, dtype=args.dtype,
        device=device, batch_size=args.batch_size,
        image_aspect_ratio=args.image_aspect_ratio, backend=args.backend, overwrite=args.overwrite,
        num_workers=args.num_workers, decode_threads=args.decode_threads, end=args.end, compile=args.compile,
        report_path=report_path, failed=missing[mlo:mhi], progress=not args.no_progress, pipeline=pipeline)
    shard = f" (shard {chunk_idx + 1}/{num_chunks})" if sharded else ""
    print(f"extract_features{shard}: {len(report['done'])} done, {len(report['skipped'])} skipped, "
          f"{len(report['failed'])} failed, {report['frames']} frames in {report['seconds']:.1f}s; "
          f"report {report_path}")
    for item in report["failed"]:
        print(f"  FAILED {item['file']}: {item['error']}", file=sys.stderr)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
