"""Decoding in worker processes started once and kept warm: frames in shared-memory slots that the parent
pins and copies to the device without a staging copy.

    pool = DecoderPool(num_workers, fps=1.0)     # forks the workers (before CUDA work and threads)
    pool.pin()                                   # on CUDA: page-locks the slots (cudaHostRegister)
    for message in pool.run(jobs): ...           # as many runs as wanted, workers stay up
    pool.close()

Each worker owns `slots` buffers of `slot_bytes` in one anonymous shared mapping (MAP_SHARED, made
before the fork: no /dev/shm file, no segment per message) and one pipe to the parent. The parent hands
each worker one file at a time, the largest first, the next as soon as it reports the last one done
(long and short files balance out). The worker decodes it with `video_io.iter_frames` (sparse decoding,
`threads` FFmpeg threads), writes up to a slot's worth of frames into a free slot and sends a small
message; the parent hands the slot back with `release` once it no longer reads it (on CUDA: when the
copy to the device is done). The slots bound the frames in flight: a worker waits for a free slot when
the consumer falls behind, and that wait is counted. Nothing is shared between workers (no queue lock a
killed worker could leave held): a worker that dies fails the file it had, and the parent sees it at
once (its sentinel).

Messages from `run`:
    {"tag": "frames", "job": i, "frames": uint8 (b, H, W, 3) view of the slot, "times": [b seconds],
     "slot": (worker, slot)}                      -> call pool.release(message["slot"]) when done with it
    {"tag": "done", "job": i}                     after the file's last frames
    {"tag": "error", "job": i, "error": message}  the file failed (its earlier frames were sent; drop them)
"""

import collections
import mmap
import os
import time
from multiprocessing.connection import wait as wait_ready

import numpy as np
import torch

from ..video_io import VideoReadError, iter_frames, load_image

SLOT_BYTES = 16 << 20  # 16 frames of 360p, 5 of 720p, 2 of 1080p: bounded memory whatever the resolution
SLOTS = 4  # per worker: one being written, the rest queued or being copied
MAX_FRAMES = 16  # frames per message at most
WAIT_S = 1.0  # every wait is this long at most, then liveness is checked
# decoders yield the CPU to the parent (which feeds the GPU and saves files) when both want it: throughput
# work under latency-bound work; with the cores all busy the decoders still use every cycle left
WORKER_NICE = 5
RESULT_TIMEOUT_S = 600.0  # no message from any worker for this long (while files are pending) is an error
START_TIMEOUT_S = 60.0


def usable_cores():
    """The cores this process may run on (a container's or taskset's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _Worker:
    """The decoder process's side: jobs and free slots come in on `conn`, frames and reports go out."""

    def __init__(self, rank, buffer, slots, slot_bytes, settings, conn):
        self.rank, self.slot_bytes, self.settings, self.conn = rank, slot_bytes, settings, conn
        self.arena = np.frombuffer(buffer, dtype=np.uint8, count=slots * slot_bytes, offset=rank * slots * slot_bytes)
        self.free = list(range(slots))
        self.jobs = collections.deque()
        self.stopped = False

    def main(self):
        torch.set_num_threads(1)  # one core's decoder; FFmpeg's threads are settings["threads"]
        os.nice(WORKER_NICE)
        self.conn.send(("ready", self.rank, os.getpid()))
        while not self.stopped:
            if self.jobs:
                self.decode(*self.jobs.popleft())
            else:
                self.take()

    def take(self):
        """Handle what the parent sent (a job, a freed slot, stop), waiting up to WAIT_S for it."""
        try:
            if not self.conn.poll(WAIT_S):
                return
            message = self.conn.recv()
        except (EOFError, OSError):  # the parent is gone: nobody reads the results
            raise SystemExit(0) from None
        if message[0] == "job":
            self.jobs.append(message[1:])
        elif message[0] == "slot":
            self.free.append(message[1])
        else:
            self.stopped = True
            raise SystemExit(0)

    def send(self, index, source, frames, times, stats):
        shape = frames[0].shape
        if any(f.shape != shape for f in frames):  # a mid-file size change: not one tensor
            raise VideoReadError(f"{source}: frames of different sizes {sorted({f.shape for f in frames})}")
        waited = time.perf_counter()
        while not self.free:
            self.take()
        stats["slot_wait_s"] += time.perf_counter() - waited
        slot = self.free.pop()
        out = self.arena[slot * self.slot_bytes: slot * self.slot_bytes + len(frames) * frames[0].nbytes]
        np.stack(frames, out=out.reshape((len(frames),) + shape))
        self.conn.send(("frames", index, slot, (len(frames),) + shape, list(times)))
        stats["samples"] += len(frames)

    def decode(self, index, source, kind):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        stats, s = {"samples": 0, "slot_wait_s": 0.0}, self.settings
        try:
            if kind == "image":
                image = load_image(source)
                self.check_fits(source, image)
                self.send(index, source, [image], [0.0], stats)
            else:
                frames, times, limit = [], [], MAX_FRAMES
                for frame, t in iter_frames(source, fps=s["fps"], backend=s["backend"], end=s["end"],
                                            threads=s["threads"]):
                    if not frames:
                        self.check_fits(source, frame)
                        limit = max(1, min(MAX_FRAMES, self.slot_bytes // frame.nbytes))
                    frames.append(frame)
                    times.append(t)
                    if len(frames) >= limit:
                        self.send(index, source, frames, times, stats)
                        frames, times = [], []
                if frames:
                    self.send(index, source, frames, times, stats)
        except VideoReadError as e:  # reported per file; the other files go on
            self.conn.send(("error", index, str(e)))
            return
        except Exception as e:
            self.conn.send(("error", index, f"{source}: {type(e).__name__}: {e}"))
            return
        stats.update(cpu_s=time.process_time() - cpu0, wall_s=time.perf_counter() - wall0)
        self.conn.send(("done", index, stats))

    def check_fits(self, source, frame):
        if frame.nbytes > self.slot_bytes:
            raise VideoReadError(f"{source}: a {frame.shape[1]}x{frame.shape[0]} frame ({frame.nbytes} bytes) does "
                                 f"not fit a decoder slot of {self.slot_bytes} bytes (DecoderPool slot_bytes)")


def _size(job):
    try:
        return os.path.getsize(job.source)
    except (OSError, TypeError, ValueError):  # a URL, or gone: it fails when decoded, by name
        return 0


def _worker_main(rank, buffer, slots, slot_bytes, settings, conn):
    _Worker(rank, buffer, slots, slot_bytes, settings, conn).main()


class DecoderPool:
    """`num_workers` decoder processes (default one per usable core) with `slots` shared slots of
    `slot_bytes` each.

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
        self._conns, self._workers = [], []
        for rank in range(self.num_workers):
            mine, theirs = context.Pipe(duplex=True)
            worker = context.Process(target=_worker_main, name=f"decoder-{rank}", daemon=True,
                                     args=(rank, self._buffer, self.slots, self.slot_bytes, self.settings, theirs))
            worker.start()
            theirs.close()
            self._conns.append(mine)
            self._workers.append(worker)
        self.pinned, self._closed, self._broken = False, False, False
        self.alive = set(range(self.num_workers))
        for rank, conn in enumerate(self._conns):
            if not conn.poll(START_TIMEOUT_S):
                self.close()
                raise RuntimeError(f"decoder process {rank} did not start in {START_TIMEOUT_S:.0f}s")
            conn.recv()  # ("ready", rank, pid)
        self.start_s = time.perf_counter() - started  # fork + the first message of every worker
        self.pids = [w.pid for w in self._workers]
        self.worker_stats = [{"files": 0, "samples": 0, "cpu_s": 0.0, "wall_s": 0.0, "slot_wait_s": 0.0}
                             for _ in range(self.num_workers)]

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

    def run(self, jobs, idle=None):
        """Decode `jobs` (objects with .index, .source, .kind): yields the messages above until every job is
        done or failed. A worker that dies fails the file it was decoding; the others go on. `idle()` is
        called before each wait for a message (the consumer hands back slots there: the workers may be
        waiting for one). A run left before its end (an error in the consumer) leaves the pool unusable."""
        if self._closed or self._broken:
            raise RuntimeError("the decoder pool is closed" if self._closed else
                               "the decoder pool's last run was left unfinished; close it and start another")
        self._broken = True  # until this run ends
        yield from self._messages(jobs, idle)
        self._broken = False

    def _messages(self, jobs, idle):
        # the largest files first: the run does not end on one worker decoding a long file alone
        todo = collections.deque(sorted(jobs, key=_size, reverse=True))
        sources = {job.index: str(job.source) for job in jobs}
        pending, current = set(sources), {}  # current: worker -> job index it decodes

        def assign(rank):
            if todo and rank in self.alive:
                job = todo.popleft()
                current[rank] = job.index
                self._conns[rank].send(("job", job.index, str(job.source), job.kind))

        for rank in sorted(self.alive):
            assign(rank)
        quiet_since = time.perf_counter()
        while pending:
            if not self.alive:
                raise RuntimeError(f"every decoder process ended; {len(pending)} file(s) not decoded")
            conns = [self._conns[r] for r in self.alive]
            ready = wait_ready(conns, timeout=0)
            if not ready:
                if idle is not None:
                    idle()
                ready = wait_ready(conns + [self._workers[r].sentinel for r in self.alive], timeout=WAIT_S)
            if not ready:
                if time.perf_counter() - quiet_since > RESULT_TIMEOUT_S:
                    raise RuntimeError(f"no message from the decoders for {RESULT_TIMEOUT_S:.0f}s; decoding "
                                       f"{sorted(sources[i] for i in current.values())}")
                continue
            quiet_since = time.perf_counter()
            for rank in sorted(self.alive):
                conn, ended = self._conns[rank], False
                while conn.poll(0):
                    try:
                        message = conn.recv()
                    except (EOFError, OSError):
                        ended = True  # the worker is gone and everything it sent has been read
                        break
                    tag = message[0]
                    if tag == "frames":
                        _, index, slot, shape, times = message
                        offset = (rank * self.slots + slot) * self.slot_bytes
                        frames = self._arena[offset: offset + int(np.prod(shape))].view(shape)  # (b, H, W, 3)
                        yield {"tag": "frames", "job": index, "frames": frames, "times": times, "slot": (rank, slot)}
                        continue
                    index = message[1]
                    current.pop(rank, None)
                    pending.discard(index)
                    if tag == "done":
                        record = self.worker_stats[rank]
                        record["files"] += 1
                        for key in ("samples", "cpu_s", "wall_s", "slot_wait_s"):
                            record[key] += message[2][key]
                        yield {"tag": "done", "job": index}
                    else:
                        yield {"tag": "error", "job": index, "error": message[2]}
                    assign(rank)
                worker = self._workers[rank]
                if ended or (not worker.is_alive() and not conn.poll(0)):
                    worker.join(timeout=WAIT_S)
                    self.alive.discard(rank)
                    index = current.pop(rank, None)
                    if index is not None:
                        pending.discard(index)
                        yield {"tag": "error", "job": index, "error": f"{sources[index]}: decoder process "
                               f"{worker.pid} ended (exit code {worker.exitcode}) while decoding it"}
        # a worker that died between files leaves nothing pending; the next run goes on without it

    def release(self, slot):
        """Give a (worker, slot) back to its worker: the parent no longer reads it."""
        rank, index = slot
        if rank in self.alive:
            try:
                self._conns[rank].send(("slot", index))
            except (BrokenPipeError, OSError):  # it died; run() reports its file
                pass

    def stats(self):
        """Per-worker totals since the pool started: files, samples, CPU and wall seconds decoding, seconds
        waiting for a free slot (the consumer behind)."""
        return [dict(r, rank=i) for i, r in enumerate(self.worker_stats)]

    def close(self):
        if self._closed:
            return
        self._closed = True
        for rank in sorted(self.alive):
            try:
                self._conns[rank].send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        deadline = time.perf_counter() + 10.0
        for worker in self._workers:
            worker.join(timeout=max(0.1, deadline - time.perf_counter()))
        for worker in self._workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=5.0)
        for conn in self._conns:
            conn.close()
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self._arena.data_ptr())
            self.pinned = False

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
