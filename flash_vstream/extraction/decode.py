"""Decoding in worker processes: files from a shared job queue, frames back in shared memory.

`DecodeStream` is the IterableDataset a `torch.utils.data.DataLoader` runs in its worker processes
(spawned: the parent may hold CUDA). Each worker takes the next file from a queue that all workers
share (long and short files balance out), decodes it with `video_io.iter_frames` (sparse decoding,
`threads` FFmpeg threads) and yields messages; the DataLoader moves the frame tensors through shared
memory and, on CUDA, into pinned memory:

    {"tag": "frames", "job": i, "frames": uint8 (b, H, W, 3), "times": [b seconds]}
    {"tag": "done", "job": i}                      after the file's last frames
    {"tag": "error", "job": i, "error": message}   the file failed (its earlier frames are dropped)
"""

import queue

import numpy as np
import torch
from torch.utils.data import IterableDataset

from ..video_io import VideoReadError, iter_frames, load_image

# a message holds at most this many bytes of frames (and at most max_frames frames): bounded memory for
# 1080p as for 360p, with prefetch_factor messages per worker in flight
CHUNK_BYTES = 32 << 20
JOB_WAIT_S = 30.0


class DecodeStream(IterableDataset):
    def __init__(self, jobs, job_queue, fps, backend, end, threads, max_frames=16):
        self.jobs = {job.index: (job.source, job.kind) for job in jobs}  # what a worker needs, picklable
        self.job_queue = job_queue  # job indices, then one None per worker
        self.fps, self.backend, self.end, self.threads = fps, backend, end, threads
        self.max_frames = max_frames

    def __iter__(self):
        torch.set_num_threads(1)  # a worker is one core's decoder
        while True:
            try:
                index = self.job_queue.get(timeout=JOB_WAIT_S)
            except queue.Empty:
                return
            if index is None:
                return
            yield from self._decode(index)

    def _decode(self, index):
        source, kind = self.jobs[index]
        try:
            if kind == "image":
                yield _frames(index, [load_image(source)], [0.0])
            else:
                frames, times, limit = [], [], self.max_frames
                for frame, t in iter_frames(source, fps=self.fps, backend=self.backend, end=self.end,
                                            threads=self.threads):
                    frames.append(frame)
                    times.append(t)
                    limit = max(1, min(self.max_frames, CHUNK_BYTES // frame.nbytes))
                    if len(frames) >= limit:
                        yield _frames(index, frames, times)
                        frames, times = [], []
                if frames:
                    yield _frames(index, frames, times)
        except VideoReadError as e:  # reported per file; the other files go on
            yield {"tag": "error", "job": index, "error": str(e)}
            return
        except Exception as e:
            yield {"tag": "error", "job": index, "error": f"{source}: {type(e).__name__}: {e}"}
            return
        yield {"tag": "done", "job": index}


def _frames(index, frames, times):
    if len({f.shape for f in frames}) > 1:  # a mid-file size change: not one tensor
        raise VideoReadError(f"frames of different sizes {sorted({f.shape for f in frames})}")
    # stacked straight into shared memory: the DataLoader then passes it on without another copy
    stacked = torch.empty((len(frames),) + frames[0].shape, dtype=torch.uint8).share_memory_()  # (b, H, W, 3)
    np.stack(frames, out=stacked.numpy())
    return {"tag": "frames", "job": index, "frames": stacked, "times": list(times)}


def decode_only(jobs, fps, backend="pyav", end=None, num_workers=None, threads=1, start_method=None):
    """Decode `jobs` in `num_workers` processes (default: one per core) as the pipeline does, encoding
    nothing: the rate the CPU side can give. Returns {"frames", "seconds", "frames_per_s", "failed"}."""
    import os
    import time

    from torch.utils.data import DataLoader

    num_workers = max(1, min(num_workers or os.cpu_count() or 1, len(jobs)))
    if start_method is None:
        start_method = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"
    context = torch.multiprocessing.get_context(start_method)
    job_queue = context.Queue()
    for job in jobs:
        job_queue.put(job.index)
    for _ in range(num_workers):
        job_queue.put(None)
    loader = DataLoader(DecodeStream(jobs, job_queue, fps, backend, end, threads), batch_size=None,
                        num_workers=num_workers, multiprocessing_context=context, in_order=False, timeout=600)
    started = time.perf_counter()
    frames = failed = 0
    for message in loader:
        frames += len(message.get("times", ()))
        failed += message["tag"] == "error"
    seconds = time.perf_counter() - started
    return {"frames": frames, "seconds": round(seconds, 3), "frames_per_s": round(frames / seconds, 1),
            "failed": failed, "workers": num_workers, "threads_per_worker": threads}
