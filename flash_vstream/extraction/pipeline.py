"""The extraction pipeline: decoder processes -> bounded queue -> device preprocessing -> encoder -> writer.

    run_pipeline(jobs, encoder, metadata, ...) -> (finished jobs, frames encoded, stats)

Decoding runs in `num_workers` spawned processes (`decode.DecodeStream` in a DataLoader: a bounded
prefetch of `prefetch` messages per worker, frames through shared memory and, on CUDA, pinned memory).
This thread copies each message's uint8 frames to the device (non-blocking), preprocesses them there
(`preprocess.DevicePreprocessor`), gathers full encoder batches across files (short clips still make
full batches; on CUDA the last batch is padded so a compiled encoder sees one shape) and launches the
encoder; the features come back into pinned memory without a wait here. A writer thread waits for each
batch's copy, splits it per file and saves a file once its last frames are in. Nothing here blocks on the
GPU, so decoding, host-to-device copies, encoding and writing overlap.

Failures stay per file as in the thread pipeline: a decode error fails its file; an encoder error fails
the files of that batch; a save error fails that file. Every queue wait has a timeout.
"""

import collections
import queue
import threading
import time

import torch
from torch.utils.data import DataLoader

from ..features import save_features
from .decode import DecodeStream
from .preprocess import DevicePreprocessor

WRITER_QUEUE = 8  # encoded batches in flight to the writer: bounds pinned memory, throttles the encoder
WAIT_S = 1.0
LOADER_TIMEOUT_S = 600.0  # no message from any decoder for this long is an error
DEFAULT_START = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"


class _Writer(threading.Thread):
    """Collects encoded rows per file and saves each file when told its last rows are in.

    Messages, in order: ("rows", event, features (n, 256, D) on the host, [(job, first row, count, times)]),
    ("close", job), ("failed", job, error), ("stop",). The only writer of `report["failed"]` and `done`
    while the pipeline runs.
    """

    def __init__(self, metadata, fps, report, bar):
        super().__init__(name="extract-writer", daemon=True)
        self.inbox = queue.Queue(maxsize=WRITER_QUEUE)
        self.metadata, self.fps, self.report, self.bar = metadata, fps, report, bar
        self.done, self.frames, self.error = [], 0, None
        self.started = time.time()
        self._partial = {}  # job index -> ([feature chunks], [timestamps])
        self.failed_jobs = set()

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
                    return
                getattr(self, "_on_" + message[0])(*message[1:])
        except BaseException as e:  # surfaced by put / finish
            self.error = f"{type(e).__name__}: {e}"
            raise

    def _on_rows(self, event, features, pieces):
        if event is not None:
            event.synchronize()  # the device-to-host copy of this batch is done
        for job, first, count, times in pieces:
            if job.index in self.failed_jobs:
                continue
            chunks, all_times = self._partial.setdefault(job.index, ([], []))
            chunks.append(features[first:first + count].clone())  # off the pinned batch
            all_times.extend(times)
            self.frames += count
        self.bar.set_postfix(frames=self.frames, fps=f"{self.frames / (time.time() - self.started):.1f}")

    def _on_close(self, job):
        chunks, times = self._partial.pop(job.index, ([], []))
        self.bar.update(1)
        try:
            feature = torch.cat(chunks)  # (T, 256, D)
            if job.kind == "image":
                feature = feature[0]  # (256, D)
            save_features(job.output, feature, dict(
                self.metadata, fps=0.0 if job.kind == "image" else self.fps, timestamps=times, source=job.source,
                kind=job.kind))
            self.done.append(job)
        except Exception as e:
            self.failed_jobs.add(job.index)
            self.report["failed"].append({"file": job.source, "error": f"saving: {type(e).__name__}: {e}"})

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


def run_pipeline(jobs, encoder, metadata, fps, backend, batch_size, end, num_workers, decode_threads, report,
                 progress, prefetch=4, start_method=DEFAULT_START):
    """Extract `jobs` (extract_features._Job) with `encoder` (extract_features.FrameEncoder).

    Returns (finished jobs, frames encoded, {"gpu_busy_fraction", "decode_workers"}); failures go to
    `report["failed"]`.
    """
    from tqdm import tqdm

    device = encoder.tower.device
    on_cuda = device.type == "cuda"
    preprocess = DevicePreprocessor(encoder.image_processor, encoder.image_aspect_ratio, dtype=encoder.tower.dtype)
    # forked workers start at once with this process's imports (spawned ones re-import torch, transformers
    # and the main module: seconds each). They never touch CUDA, as DataLoader workers of a training loop;
    # they are started here, before this module's writer thread exists.
    context = torch.multiprocessing.get_context(start_method)
    job_queue = context.Queue()
    for job in jobs:
        job_queue.put(job.index)
    for _ in range(num_workers):
        job_queue.put(None)  # one end marker per worker
    loader = DataLoader(DecodeStream(jobs, job_queue, fps, backend, end, decode_threads), batch_size=None,
                        num_workers=num_workers, multiprocessing_context=context, pin_memory=on_cuda,
                        prefetch_factor=prefetch, in_order=False, timeout=LOADER_TIMEOUT_S)
    messages = iter(loader)  # starts the decoder processes
    bar = tqdm(total=len(jobs), unit="file", desc="extract", disable=not progress, dynamic_ncols=True)
    writer = _Writer(metadata, fps, report, bar)
    writer.start()
    clock = _BusyClock(on_cuda)
    by_index = {job.index: job for job in jobs}
    pending = collections.deque()  # [job, pixels (b, 3, S, S) on the device, times], not yet encoded
    pending_rows = {}  # job index -> rows in `pending` (files with rows only)
    closing, failed = [], set()

    def fail(job, error):
        failed.add(job.index)
        for entry in [e for e in pending if e[0].index == job.index]:
            pending.remove(entry)
        pending_rows.pop(job.index, None)
        closing[:] = [j for j in closing if j.index != job.index]
        writer.put(("failed", job, error))

    def send_closings():
        for job in [j for j in closing if j.index not in pending_rows]:
            closing.remove(job)
            writer.put(("close", job))

    def encode(n):
        """Encode the first `n` pending rows as one batch and hand the result to the writer."""
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
            features = encoder.features(x)[:n]  # (n, 256, D) on the device, output dtype
            if on_cuda:
                host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
                host.copy_(features, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host, event = features, None
        except Exception as e:
            for job in {p[0].index: p[0] for p in pieces}.values():
                fail(job, f"encoding: {type(e).__name__}: {e}")
            return
        finally:
            clock.stop(start)
        writer.put(("rows", event, host, [p for p in pieces if p[0].index not in failed]))

    try:
        with torch.inference_mode():
            for message in messages:
                job = by_index[message["job"]]
                if job.index in failed:
                    continue
                if message["tag"] == "error":
                    fail(job, message["error"])
                elif message["tag"] == "done":
                    closing.append(job)
                else:
                    start = clock.start()
                    try:
                        pixels = preprocess(message["frames"].to(device, non_blocking=True))  # (b, 3, S, S)
                    except Exception as e:
                        fail(job, f"{job.source}: preprocessing: {type(e).__name__}: {e}")
                        continue
                    finally:
                        clock.stop(start)
                    pending.append([job, pixels, message["times"]])
                    pending_rows[job.index] = pending_rows.get(job.index, 0) + len(message["times"])
                    while sum(len(e[2]) for e in pending) >= batch_size:
                        encode(batch_size)
                send_closings()
            if pending:
                encode(sum(len(e[2]) for e in pending))
            send_closings()
            if closing:
                raise RuntimeError(f"files left unsaved: {[j.source for j in closing]}")
        writer.put(("stop",))
        writer.join()
        if writer.error:
            raise RuntimeError(f"the writer thread failed: {writer.error}")
        stats = {"gpu_busy_fraction": clock.fraction(), "decode_workers": num_workers}
    finally:
        bar.close()
    accounted = {j.index for j in writer.done} | failed | writer.failed_jobs
    missing = [j.source for j in jobs if j.index not in accounted]
    for source in missing:  # a decoder process that died mid-file (the loader raises first, normally)
        report["failed"].append({"file": source, "error": "decoder ended without finishing the file"})
    return writer.done, writer.frames, stats
