"""The extraction pipeline: decoder processes -> shared slots -> device preprocessing -> encoder -> writer.

    run_pipeline(jobs, encoder, metadata, fps, batch_size, report, progress, pool)
        -> (finished jobs, frames encoded, stats)

Decoding runs in the processes of a `decode.DecoderPool`, started before this (and before CUDA work) and
kept warm between runs. Its shared slots bound the frames in flight and, on CUDA, are page-locked: this
thread copies each message's uint8 frames straight from the slot to the device (non-blocking), hands the
slot back once the copy is done, preprocesses there (`preprocess.DevicePreprocessor`), gathers full encoder
batches across files (short clips still make full batches; on CUDA the last batch is padded so a compiled
encoder sees one shape) and launches the encoder. Each file's features stay on the device until its last
frames are encoded, then come back in one copy into pinned memory, without a wait here; a saver thread waits
for that copy and writes the file from the pinned buffer (no per-batch split or join on the host: the
parent's CPU is taken from the decoders). Nothing here blocks on the GPU, so decoding, copies, encoding and
writing overlap.

Failures stay per file as in the thread pipeline: a decode error fails its file; an encoder error fails
the files of that batch; a save error fails that file. Every queue wait has a timeout.
"""

import collections
import concurrent.futures
import queue
import threading
import time

import torch

from ..features import save_features
from .preprocess import DevicePreprocessor

WRITER_QUEUE = 8  # files (or long files' parts) in flight to the writer: bounds pinned memory, throttles the encoder
# a file's features stay on the device until it ends, then come to the host in one copy (no per-batch host
# copies, nothing joined on the host for a short clip); a longer file moves every FLUSH_ROWS rows (128 MiB of
# ViT-L features): device memory stays bounded for long videos
FLUSH_ROWS = 256
WAIT_S = 1.0
SAVE_THREADS = 4  # files saved at once


class _Writer(threading.Thread):
    """Saves each file once its last rows are in, on one of SAVE_THREADS saver threads (each save is
    serialised, written and fsynced: one thread would cap the rate at the disk's fsync latency).

    A file's features arrive as host tensors (pinned on CUDA) copied from the device without a wait in the
    feeding thread; the saver waits for the copy's event. A file whose rows fit FLUSH_ROWS comes in one
    piece and is saved from that buffer as it is (no copy on the host); a longer one in several, joined
    when saved. Messages, in order: ("part", job, event, host (n, 256, D), times) for rows of a file not
    ended yet, ("close", job, event, host or None, times) for its last rows, ("failed", job, error),
    ("stop",). `report["failed"]`, `done` and `failed_jobs` are written here and by the savers (list
    appends and set adds: atomic), read after `join`.
    """

    def __init__(self, metadata, fps, report, bar):
        super().__init__(name="extract-writer", daemon=True)
        self.inbox = queue.Queue(maxsize=WRITER_QUEUE)
        self.metadata, self.fps, self.report, self.bar = metadata, fps, report, bar
        self.done, self.error = [], None
        self.rows, self.frames = 0, 0  # rows received (the progress bar), frames of the files saved
        self.started = time.time()
        self._partial = {}  # job index -> [(event, host rows)], [timestamps]: a long file's earlier parts
        self.failed_jobs = set()
        self.save_s = 0.0  # seconds spent saving, summed over the savers
        self._savers = concurrent.futures.ThreadPoolExecutor(SAVE_THREADS, thread_name_prefix="extract-save")
        self._in_flight = threading.BoundedSemaphore(2 * SAVE_THREADS)  # files held in memory awaiting a saver
        self._lock = threading.Lock()

    def put(self, message):
        while True:
            try:
                self.inbox.put(message, timeout=WAIT_S)
                return
            except queue.Full:
                if not self.is_alive():
                    raise RuntimeError(f"the writer thread ended: {self.error}") from None

    def run(self):
        try:
            while True:
                try:
                    message = self.inbox.get(timeout=WAIT_S)
                except queue.Empty:
                    continue
                if message[0] == "stop":
                    break
                getattr(self, "_on_" + message[0])(*message[1:])
        except BaseException as e:  # surfaced by put / finish
            self.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self._savers.shutdown(wait=True)  # every save submitted has ended

    def _on_part(self, job, event, host, times):
        if job.index in self.failed_jobs:
            return
        parts, all_times = self._partial.setdefault(job.index, ([], []))
        parts.append((event, host))
        all_times.extend(times)
        self._count(len(times))

    def _on_close(self, job, event, host, times):
        parts, all_times = self._partial.pop(job.index, ([], []))
        if host is not None:
            parts.append((event, host))
            all_times.extend(times)
            self._count(len(times))
        self.bar.update(1)
        while not self._in_flight.acquire(timeout=WAIT_S):
            pass  # savers busy: waiting here throttles the encoder through the inbox
        self._savers.submit(self._save, job, parts, all_times)

    def _count(self, rows):
        self.rows += rows
        self.bar.set_postfix(frames=self.rows, fps=f"{self.rows / (time.time() - self.started):.1f}")

    def _save(self, job, parts, times):
        started = time.perf_counter()
        try:
            for event, _ in parts:
                if event is not None:
                    event.synchronize()  # the device-to-host copy is done (a blocking event: this thread sleeps)
            if not parts:
                raise RuntimeError("no frames reached the writer")
            feature = parts[0][1] if len(parts) == 1 else torch.cat([host for _, host in parts])  # (T, 256, D)
            if job.kind == "image":
                feature = feature[0]  # (256, D)
            save_features(job.output, feature, dict(
                self.metadata, fps=0.0 if job.kind == "image" else self.fps, timestamps=times, source=job.source,
                kind=job.kind))
            with self._lock:
                self.frames += len(times)
            self.done.append(job)
        except Exception as e:
            self.failed_jobs.add(job.index)
            self.report["failed"].append({"file": job.source, "error": f"saving: {type(e).__name__}: {e}"})
        finally:
            with self._lock:
                self.save_s += time.perf_counter() - started
            self._in_flight.release()

    def _on_failed(self, job, error):
        if job.index in self.failed_jobs:
            return
        self.failed_jobs.add(job.index)
        self._partial.pop(job.index, None)
        self.bar.update(1)
        self.report["failed"].append({"file": job.source, "error": error})


class _BusyClock:
    """GPU busy time from CUDA event pairs around the work this thread launches (None off CUDA)."""

    def __init__(self, on_cuda):
        self.on_cuda = on_cuda
        self.pairs = collections.deque()
        self.busy_ms = 0.0
        self.first = self.last = None

    def start(self):
        if not self.on_cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        if self.first is None:
            self.first = event
        return event

    def stop(self, start):
        if start is None:
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.last = end
        self.pairs.append((start, end))
        while self.pairs and self.pairs[0][1].query():  # drain the finished ones: bounded memory
            a, b = self.pairs.popleft()
            self.busy_ms += a.elapsed_time(b)

    def fraction(self):
        """Busy time over the span from the first launch to the end of the last one."""
        if not self.on_cuda or self.first is None:
            return None
        self.last.synchronize()
        for a, b in self.pairs:
            self.busy_ms += a.elapsed_time(b)
        self.pairs.clear()
        span = self.first.elapsed_time(self.last)
        return round(self.busy_ms / span, 4) if span > 0 else None


def run_pipeline(jobs, encoder, metadata, fps, batch_size, report, progress, pool):
    """Extract `jobs` (extract_features._Job) with `encoder` (extract_features.FrameEncoder), decoding in
    `pool` (a started decode.DecoderPool).

    Returns (finished jobs, frames encoded, stats); failures go to `report["failed"]`. stats:
    gpu_busy_fraction (None off CUDA), decode_workers, pinned (slots page-locked), input_wait_s (this thread
    waiting for decoded frames: decoding is the limit when it is most of the run), slot_wait_s (decoders
    waiting for a free slot, summed over them: the consumer is the limit when it is large), save_s (saving,
    summed over the savers) and parent_cpu_s (CPU seconds of this process: what it takes from the decoders).
    """
    from tqdm import tqdm

    device = encoder.tower.device
    on_cuda = device.type == "cuda"
    pinned = pool.pin() if on_cuda else False
    preprocess = DevicePreprocessor(encoder.image_processor, encoder.image_aspect_ratio, dtype=encoder.tower.dtype)
    bar = tqdm(total=len(jobs), unit="file", desc="extract", disable=not progress, dynamic_ncols=True)
    writer = _Writer(metadata, fps, report, bar)
    writer.start()
    clock = _BusyClock(on_cuda)
    by_index = {job.index: job for job in jobs}
    pending = collections.deque()  # [job, pixels (b, 3, S, S) on the device, times], not yet encoded
    pending_rows = {}  # job index -> rows in `pending` (files with rows only)
    on_device = {}  # job index -> ([encoded rows (n, 256, D) on the device], [times]) not yet sent to the writer
    releases = collections.deque()  # (CUDA event after a slot's copy, slot): handed back once the copy is done
    closing, failed = [], set()
    slot_wait0 = sum(r["slot_wait_s"] for r in pool.worker_stats)

    def release_done(wait=False):
        while releases and (wait or releases[0][0].query()):
            event, slot = releases.popleft()
            event.synchronize()
            pool.release(slot)

    def fail(job, error):
        failed.add(job.index)
        for entry in [e for e in pending if e[0].index == job.index]:
            pending.remove(entry)
        pending_rows.pop(job.index, None)
        on_device.pop(job.index, None)
        closing[:] = [j for j in closing if j.index != job.index]
        writer.put(("failed", job, error))

    def to_host(job):
        """(event, host rows, times) of `job`'s rows on the device, copied without a wait here; (None, None,
        []) when none are left."""
        chunks, times = on_device.pop(job.index, ([], []))
        if not chunks:
            return None, None, []
        rows = chunks[0] if len(chunks) == 1 else torch.cat(chunks)  # (n, 256, D) on the device
        if not on_cuda:
            return None, rows, times
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        host.copy_(rows, non_blocking=True)
        event = torch.cuda.Event(blocking=True)  # the saver's wait sleeps: a spin would take a decoder's core
        event.record()
        return event, host, times

    def send_closings():
        for job in [j for j in closing if j.index not in pending_rows]:
            closing.remove(job)
            writer.put(("close", job, *to_host(job)))

    def encode(n):
        """Encode the first `n` pending rows as one batch; each file's rows stay on the device (its own copy,
        not a view holding the batch) until the file ends or reaches FLUSH_ROWS."""
        pieces, parts, taken = [], [], 0
        while taken < n:
            job, pixels, times = pending[0]
            count = min(n - taken, len(times))
            if count == len(times):
                pending.popleft()
            else:
                pending[0] = [job, pixels[count:], times[count:]]
                pixels = pixels[:count]
            pieces.append((job, taken, count, times[:count]))
            parts.append(pixels)
            pending_rows[job.index] -= count
            if not pending_rows[job.index]:
                del pending_rows[job.index]
            taken += count
        start = clock.start()
        try:
            x = torch.cat(parts)  # (n, 3, S, S)
            if on_cuda and n < batch_size:  # one shape for a compiled encoder
                x = torch.cat([x, x.new_zeros((batch_size - n,) + tuple(x.shape[1:]))])
            features = encoder.features(x)  # (batch, 256, D) on the device, output dtype
            for job, first, count, times in pieces:
                chunks, all_times = on_device.setdefault(job.index, ([], []))
                chunks.append(features[first:first + count].clone())
                all_times.extend(times)
                if len(all_times) >= FLUSH_ROWS:
                    writer.put(("part", job, *to_host(job)))
        except Exception as e:
            for job in {p[0].index: p[0] for p in pieces}.values():
                fail(job, f"encoding: {type(e).__name__}: {e}")
        finally:
            clock.stop(start)

    def to_pixels(job, message):
        """The message's frames, preprocessed on the device; its slot handed back (now, or when copied)."""
        start, queued = clock.start(), False
        try:
            frames = message["frames"]  # (b, H, W, 3) uint8, a view of the decoder's slot
            if on_cuda:
                frames = frames.to(device, non_blocking=True)
                event = torch.cuda.Event(blocking=True)  # waited on in release_done(wait=True): sleeps
                event.record()
                releases.append((event, message["slot"]))
                queued = True
            return preprocess(frames)  # (b, 3, S, S): new memory, the slot is not read after this
        except Exception as e:
            fail(job, f"{job.source}: preprocessing: {type(e).__name__}: {e}")
            return None
        finally:
            if not queued:  # on the CPU (or a failed copy) nothing reads the slot any more
                pool.release(message["slot"])
            clock.stop(start)

    input_wait, cpu0 = 0.0, time.process_time()
    try:
        with torch.inference_mode():
            messages = pool.run(jobs, idle=lambda: release_done(wait=True))
            while True:
                waited = time.perf_counter()
                message = next(messages, None)
                input_wait += time.perf_counter() - waited
                if message is None:
                    break
                job = by_index[message["job"]]
                if job.index in failed:
                    if message["tag"] == "frames":
                        pool.release(message["slot"])
                elif message["tag"] == "error":
                    fail(job, message["error"])
                elif message["tag"] == "done":
                    closing.append(job)
                else:
                    pixels = to_pixels(job, message)
                    if pixels is not None:
                        pending.append([job, pixels, message["times"]])
                        pending_rows[job.index] = pending_rows.get(job.index, 0) + len(message["times"])
                        while sum(len(e[2]) for e in pending) >= batch_size:
                            encode(batch_size)
                release_done()
                send_closings()
            if pending:
                encode(sum(len(e[2]) for e in pending))
            release_done(wait=True)
            send_closings()
            if closing:
                raise RuntimeError(f"files left unsaved: {[j.source for j in closing]}")
        writer.put(("stop",))
        writer.join()
        if writer.error:
            raise RuntimeError(f"the writer thread failed: {writer.error}")
        stats = {"gpu_busy_fraction": clock.fraction(), "decode_workers": pool.num_workers, "pinned": pinned,
                 "input_wait_s": round(input_wait, 3), "save_s": round(writer.save_s, 3),
                 "parent_cpu_s": round(time.process_time() - cpu0, 3),  # this process, all its threads
                 "slot_wait_s": round(sum(r["slot_wait_s"] for r in pool.worker_stats) - slot_wait0, 3)}
    finally:
        release_done(wait=True)
        bar.close()
    accounted = {j.index for j in writer.done} | failed | writer.failed_jobs
    missing = [j.source for j in jobs if j.index not in accounted]
    for source in missing:  # should not happen: every job ends done or failed
        report["failed"].append({"file": source, "error": "decoding ended without finishing the file"})
    return writer.done, writer.frames, stats
