"""Decoding in worker processes started once and kept warm: files from a shared job queue, frames in
shared-memory slots that the parent pins and copies to the device without a staging copy.

    pool = DecoderPool(num_workers, fps=1.0)     # forks the workers (before CUDA work and threads)
    pool.pin()                                   # on CUDA: page-locks the slots (cudaHostRegister)
    for message in pool.run(jobs): ...           # as many runs as wanted, workers stay up
    pool.close()

Each worker owns `slots` buffers of `slot_bytes` in one anonymous shared mapping (MAP_SHARED, made
before the fork: no /dev/shm file, no segment per message). It takes the next file from a queue all
workers share (long and short files balance out), decodes it with `video_io.iter_frames` (sparse
decoding, `threads` FFmpeg threads), writes up to a slot's worth of frames into a free slot and sends
a small message; the parent hands the slot back with `release` once it no longer reads it (on CUDA:
when the copy to the device is done). The slots bound the frames in flight: a worker waits for a free
slot when the consumer falls behind, and that wait is counted.

Messages from `run`:
    {"tag": "frames", "job": i, "frames": uint8 (b, H, W, 3) view of the slot, "times": [b seconds],
     "slot": (worker, slot)}                      -> call pool.release(message["slot"]) when done with it
    {"tag": "done", "job": i}                     after the file's last frames
    {"tag": "error", "job": i, "error": message}  the file failed (its earlier frames were sent; drop them)
"""

import mmap
import os
import queue
import time

import numpy as np
import torch

from ..video_io import VideoReadError, iter_frames, load_image

SLOT_BYTES = 16 << 20  # 16 frames of 360p, 5 of 720p, 2 of 1080p: bounded memory whatever the resolution
SLOTS = 4  # per worker: one being written, the rest queued or being copied
MAX_FRAMES = 16  # frames per message at most
WAIT_S = 1.0  # every queue wait is this long at most, then liveness is checked
# decoders yield the CPU to the parent (which feeds the GPU and saves files) when both want it: throughput
# work under latency-bound work; with the cores all busy the decoders still use every cycle left
WORKER_NICE = 5
RESULT_TIMEOUT_S = 600.0  # no message from any worker for this long (while files are pending) is an error


def usable_cores():
    """The cores this process may run on (a container's or taskset's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _worker_main(rank, buffer, slots, slot_bytes, settings, jobs, free, results, parent):
    """One decoder process: files from `jobs` until None; frames into this worker's slots of `buffer`."""
    torch.set_num_threads(1)  # the worker is one core's decoder; FFmpeg's threads are `settings["threads"]`
    os.nice(WORKER_NICE)
    base = rank * slots * slot_bytes
    arena = np.frombuffer(buffer, dtype=np.uint8, count=slots * slot_bytes, offset=base)
    results.put(("ready", rank, os.getpid()))
    while True:
        try:
            item = jobs.get(timeout=WAIT_S)
        except queue.Empty:
            if os.getppid() != parent:  # the parent is gone: nobody reads the results
                return
            continue
        if item is None:
            return
        _decode_file(rank, item, arena, slot_bytes, settings, free, results, parent)


def _decode_file(rank, item, arena, slot_bytes, settings, free, results, parent):
    index, source, kind = item
    results.put(("start", rank, index))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    stats = {"samples": 0, "slot_wait_s": 0.0}

    def send(frames, times):
        shape = frames[0].shape
        if any(f.shape != shape for f in frames):  # a mid-file size change: not one tensor
            raise VideoReadError(f"{source}: frames of different sizes {sorted({f.shape for f in frames})}")
        waited = time.perf_counter()
        while True:
            try:
                slot = free.get(timeout=WAIT_S)
                break
            except queue.Empty:
                if os.getppid() != parent:
                    raise SystemExit(0) from None
        stats["slot_wait_s"] += time.perf_counter() - waited
        out = arena[slot * slot_bytes: slot * slot_bytes + len(frames) * frames[0].nbytes]
        np.stack(frames, out=out.reshape((len(frames),) + shape))
        results.put(("frames", rank, index, slot, (len(frames),) + shape, list(times)))
        stats["samples"] += len(frames)

    try:
        if kind == "image":
            image = load_image(source)
            _check_fits(source, image, slot_bytes)
            send([image], [0.0])
        else:
            frames, times, limit = [], [], MAX_FRAMES
            for frame, t in iter_frames(source, fps=settings["fps"], backend=settings["backend"],
                                        end=settings["end"], threads=settings["threads"]):
                if not frames:
                    _check_fits(source, frame, slot_bytes)
                    limit = max(1, min(MAX_FRAMES, slot_bytes // frame.nbytes))
                frames.append(frame)
                times.append(t)
                if len(frames) >= limit:
                    send(frames, times)
                    frames, times = [], []
            if frames:
                send(frames, times)
    except VideoReadError as e:  # reported per file; the other files go on
        results.put(("error", rank, index, str(e)))
        return
    except Exception as e:
        results.put(("error", rank, index, f"{source}: {type(e).__name__}: {e}"))
        return
    stats.update(cpu_s=time.process_time() - cpu0, wall_s=time.perf_counter() - wall0)
    results.put(("done", rank, index, stats))


def _check_fits(source, frame, slot_bytes):
    if frame.nbytes > slot_bytes:
        raise VideoReadError(f"{source}: a {frame.shape[1]}x{frame.shape[0]} frame ({frame.nbytes} bytes) does not "
                             f"fit a decoder slot of {slot_bytes} bytes (DecoderPool slot_bytes)")


class DecoderPool:
    """`num_workers` decoder processes (default one per core) with `slots` shared slots of `slot_bytes` each.

    Workers are forked at construction: build the pool before the process starts threads or uses CUDA
    (the workers never touch CUDA, as a training loop's DataLoader workers). Fork only: the shared
    mapping is inherited, not named.
    """

    def __init__(self, num_workers=None, fps=1.0, backend="pyav", end=None, threads=1, slots=SLOTS,
                 slot_bytes=SLOT_BYTES):
        if "fork" not in torch.multiprocessing.get_all_start_methods():
            raise RuntimeError("DecoderPool needs the fork start method (Linux); use --pipeline threads")
        self.num_workers = max(1, int(num_workers or usable_cores()))
        self.slots, self.slot_bytes = int(slots), int(slot_bytes)
        self.settings = {"fps": fps, "backend": backend, "end": end, "threads": int(threads)}
        started = time.perf_counter()
        self._buffer = mmap.mmap(-1, self.num_workers * self.slots * self.slot_bytes)  # anonymous, shared
        self._arena = torch.frombuffer(self._buffer, dtype=torch.uint8)  # the parent's view of every slot
        context = torch.multiprocessing.get_context("fork")
        self._jobs = context.Queue()
        self._results = context.Queue()
        self._free = [context.Queue() for _ in range(self.num_workers)]
        for free in self._free:
            for slot in range(self.slots):
                free.put(slot)
        self._workers = [context.Process(target=_worker_main, name=f"decoder-{rank}", daemon=True,
                                         args=(rank, self._buffer, self.slots, self.slot_bytes, self.settings,
                                               self._jobs, self._free[rank], self._results, os.getpid()))
                         for rank in range(self.num_workers)]
        for worker in self._workers:
            worker.start()
        ready = set()
        while len(ready) < self.num_workers:
            tag, rank, *_ = self._get(lambda: f"{self.num_workers - len(ready)} decoder(s) did not start")
            if tag == "ready":
                ready.add(rank)
        self.start_s = time.perf_counter() - started  # fork + first queue round trip of every worker
        self.pinned = False
        self.current = {}  # worker -> job index it is decoding
        self.worker_stats = [{"files": 0, "samples": 0, "cpu_s": 0.0, "wall_s": 0.0, "slot_wait_s": 0.0}
                             for _ in range(self.num_workers)]
        self._closed = self._broken = False

    def pin(self):
        """Page-lock the slots for asynchronous copies to the GPU (once; a no-op without CUDA). Returns
        whether they are pinned; when the driver refuses, copies still work, staged by the driver."""
        if self.pinned or not torch.cuda.is_available():
            return self.pinned
        try:
            code = torch.cuda.cudart().cudaHostRegister(self._arena.data_ptr(), self._arena.numel(), 0)
            self.pinned = int(getattr(code, "value", code)) == 0
        except Exception:  # an old runtime without the binding: unpinned copies
            self.pinned = False
        return self.pinned

    def _get(self, what, timeout=RESULT_TIMEOUT_S):
        """The next result; raises naming `what()` when every worker died or nothing came in `timeout`."""
        waited = 0.0
        while True:
            try:
                return self._results.get(timeout=WAIT_S)
            except queue.Empty:
                waited += WAIT_S
                dead = [w for w in self._workers if not w.is_alive()]
                if len(dead) == len(self._workers) or waited >= timeout:
                    codes = sorted({w.exitcode for w in dead}, key=str)
                    raise RuntimeError(f"{what()}: {len(dead)} of {self.num_workers} decoder processes ended "
                                       f"(exit codes {codes}), no message for {waited:.0f}s") from None

    def run(self, jobs, idle=None):
        """Decode `jobs` (objects with .index, .source, .kind): yields the messages above until every job is
        done or failed. A worker that dies fails the file it was decoding; the others go on. `idle()` is
        called before each wait for a message (the consumer hands back slots there: the workers may be
        waiting for one). A run left before its end (an error in the consumer) leaves the pool unusable."""
        if self._closed or self._broken:
            raise RuntimeError("the decoder pool is closed" if self._closed else
                               "the decoder pool's last run was left unfinished; close it and start another")
        pending = {}
        for job in jobs:
            pending[job.index] = job
            self._jobs.put((job.index, str(job.source), job.kind))
        self._broken = True  # until this run ends
        yield from self._messages(jobs, pending, idle)
        self._broken = False

    def _messages(self, jobs, pending, idle):
        lost, quiet_since = set(), time.perf_counter()
        while pending:
            try:
                message = self._results.get_nowait()
            except queue.Empty:
                if idle is not None:
                    idle()
                message = None
            if message is None:
                try:
                    message = self._results.get(timeout=WAIT_S)
                except queue.Empty:
                    message = None
            if message is None:
                for rank, worker in enumerate(self._workers):
                    if not worker.is_alive() and rank not in lost:
                        lost.add(rank)
                        index = self.current.pop(rank, None)
                        if index in pending:
                            pending.pop(index)
                            yield {"tag": "error", "job": index, "error": f"{self._source(jobs, index)}: decoder "
                                   f"process {worker.pid} ended (exit code {worker.exitcode}) while decoding it"}
                if len(lost) == len(self._workers) and pending:
                    raise RuntimeError(f"every decoder process ended; {len(pending)} file(s) not decoded")
                if time.perf_counter() - quiet_since > RESULT_TIMEOUT_S:
                    stuck = sorted(self._source(jobs, i) for i in self.current.values())
                    raise RuntimeError(f"no message from the decoders for {RESULT_TIMEOUT_S:.0f}s; decoding {stuck}")
                continue
            quiet_since = time.perf_counter()
            tag, rank = message[0], message[1]
            if tag == "start":
                self.current[rank] = message[2]
            elif tag == "frames":
                _, _, index, slot, shape, times = message
                offset = (rank * self.slots + slot) * self.slot_bytes
                count = int(np.prod(shape))
                frames = self._arena[offset: offset + count].view(shape)  # (b, H, W, 3) uint8, no copy
                yield {"tag": "frames", "job": index, "frames": frames, "times": times, "slot": (rank, slot)}
            elif tag == "done":
                index, stats = message[2], message[3]
                self.current.pop(rank, None)
                record = self.worker_stats[rank]
                record["files"] += 1
                for key in ("samples", "cpu_s", "wall_s", "slot_wait_s"):
                    record[key] += stats[key]
                pending.pop(index, None)
                yield {"tag": "done", "job": index}
            elif tag == "error":
                self.current.pop(rank, None)
                pending.pop(message[2], None)
                yield {"tag": "error", "job": message[2], "error": message[3]}

    @staticmethod
    def _source(jobs, index):
        return next((str(j.source) for j in jobs if j.index == index), f"job {index}")

    def release(self, slot):
        """Give a (worker, slot) back to its worker: the parent no longer reads it."""
        rank, index = slot
        self._free[rank].put(index)

    def stats(self):
        """Per-worker totals since the pool started: files, samples, CPU and wall seconds decoding, seconds
        waiting for a free slot (the consumer behind)."""
        return [dict(r, rank=i) for i, r in enumerate(self.worker_stats)]

    def close(self):
        if self._closed:
            return
        self._closed = True
        for _ in self._workers:
            self._jobs.put(None)
        deadline = time.perf_counter() + 10.0
        for worker in self._workers:
            worker.join(timeout=max(0.1, deadline - time.perf_counter()))
        for worker in self._workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=5.0)
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self._arena.data_ptr())
            self.pinned = False
        for q in [self._jobs, self._results, *self._free]:
            q.cancel_join_thread()
            q.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def decode_only(jobs, fps, backend="pyav", end=None, num_workers=None, threads=1, pool=None):
    """Decode `jobs` in decoder processes as the pipeline does, encoding nothing: the rate the CPU side can
    give. With `pool` (already started) the timed span is the decoding alone; without, a pool of
    `num_workers` is started and closed here and its start-up is reported apart.

    Returns {"frames", "seconds", "frames_per_s", "failed", "workers", "threads_per_worker", "start_s",
    "cpu_s", "slot_wait_s"} (cpu_s and slot_wait_s summed over the workers).
    """
    own = pool is None
    if own:
        pool = DecoderPool(min(num_workers or usable_cores(), max(1, len(jobs))), fps=fps, backend=backend,
                           end=end, threads=threads)
    try:
        before = [dict(r) for r in pool.worker_stats]
        started = time.perf_counter()
        frames = failed = 0
        for message in pool.run(jobs):
            if message["tag"] == "frames":
                frames += len(message["times"])
                pool.release(message["slot"])
            failed += message["tag"] == "error"
        seconds = time.perf_counter() - started
        cpu = sum(r["cpu_s"] - b["cpu_s"] for r, b in zip(pool.worker_stats, before))
        wait = sum(r["slot_wait_s"] - b["slot_wait_s"] for r, b in zip(pool.worker_stats, before))
        return {"frames": frames, "seconds": round(seconds, 3), "frames_per_s": round(frames / seconds, 1),
                "failed": failed, "workers": pool.num_workers, "threads_per_worker": pool.settings["threads"],
                "start_s": round(pool.start_s, 3), "cpu_s": round(cpu, 3), "slot_wait_s": round(wait, 3)}
    finally:
        if own:
            pool.close()
