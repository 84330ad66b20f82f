"""Batched ingest: one engine tick's frames, one from each of many sessions, as one CLIP batch and one
STAR memory update.

`IngestBatcher.ingest` takes (name, session, frame, timestamp) items and runs, for all of them at once:
  1. preprocessing: with the tower on CUDA (`device_preprocess`), the tick's uint8 frames of one size go to the
     GPU in one pinned copy and are preprocessed there together (`extraction.preprocess.DevicePreprocessor`,
     within the processor's PIL path by the tolerance tests/test_extract_pipeline.py states): ~1.5 ms of
     mostly GIL-holding host work per frame otherwise, the lane's limit at a few hundred streams. Else (CPU:
     exactly what a lone session computes), per frame on a few threads. A frame that is not an image fails its
     own item only;
  2. one CLIP forward per group of sessions that share a model and a vision path (the fast path's
     `FastVisionEncoder` on CUDA, the tower's own modules otherwise): `StreamSession.batch_encoder`;
  3. one `MemoryStack.update` per group of memories of one config, device, dtype and Semantic Attention:
     the batcher keeps one stack per group, and a session's memory joins it at its first batched frame;
  4. one read of every memory's tokens and one device-to-host copy of their timestamps, then each session
     publishes its snapshot.
On CUDA (sessions without a fast path of their own: the server's) the whole tick runs on a high-priority
stream of the lane's own, synchronised once at its end: the
answer lane's kernels (default stream) neither delay the tick's nor sit in front of its host syncs (the
snapshots' hand-over), and a snapshot's tokens are marked as used on the default stream, where answers read them.
A session's memory then holds exactly what it would hold fed alone (`StreamSession.add_frame`): a lone memory
runs the same batched update with a batch of one. The CLIP features are equal too without the fast path on CPU
(the patch embedding runs frame by frame there, and the frames are preprocessed on the host); the fast path's batched CLIP path is compiled and rounds
differently from its one-frame CUDA graph (see `FastVisionEncoder`), as a batched GPU product may.

Sessions that are not `StreamSession`s (anything with `add_frame`) are fed one at a time.
"""

import concurrent.futures
import contextlib
import threading

import numpy as np
import torch

from ..model.memory import MemoryStack
from .session import StreamSession


class FrameError(ValueError):
    """A session's frame could not be ingested; the message names the session and the frame."""


class IngestBatcher:
    """The shared memory stacks of an engine's sessions, and the batched ingest of a tick's frames."""

    def __init__(self, preprocess_threads=8, device_preprocess=None):
        # device_preprocess: the tick's frames preprocessed together on the tower's device (None: when it is CUDA)
        self.device_preprocess = device_preprocess
        self._preprocessors = {}  # (id(image processor), aspect ratio) -> DevicePreprocessor, or None: not one
        self._staging = {}  # (H, W) -> pinned uint8 (B, H, W, 3): the host side of a tick's upload, reused
        self._lane_streams = {}  # CUDA device -> the lane's high-priority stream
        # preprocessing (PIL resize, normalisation: ~3 ms of CPU for a 320x240 frame) of a tick's frames on a pool of
        # threads (PIL releases the GIL): serially it would cap a lane at a few hundred 1-fps streams
        self.preprocess_threads = int(preprocess_threads)
        self._pool = None  # the ThreadPoolExecutor, at the first tick of several frames
        self._stacks = {}  # (config key, device, dtype, id(attention module)) -> MemoryStack
        # (id(model), fast) -> (model, the batch encoder of the first session seen): one encoder per model, so that
        # a fast path's graphs and compiled code are built once, not for every session that leads a batch
        self._encoders = {}

    def stacks(self):
        return list(self._stacks.values())

    def ingest(self, items):
        """items: [(name, session, frame, timestamp)], at most one per session -> one result per item, in order:
        the session's new `MemorySnapshot`, or the exception that failed it (the other items go on)."""
        results = [None] * len(items)
        if len({id(item[1]) for item in items}) != len(items):
            raise ValueError("one frame per session and tick")
        batched = []
        for i, (name, session, frame, t) in enumerate(items):
            if isinstance(session, StreamSession):
                batched.append(i)
            else:
                results[i] = _attempt(lambda: session.add_frame(frame, t))

        with self._on_lane_streams([items[i][1] for i in batched]) as streams:
            pixels = self._preprocess(items, batched)
            ready = _passed(pixels, batched, results)
            features = self._encode(items, pixels, ready)
            for i, result in self._remember(items, features, _passed(features, ready, results)).items():
                results[i] = result
        return results

    @contextlib.contextmanager
    def _on_lane_streams(self, sessions):
        """The tick on the lane's own high-priority stream of every CUDA device its sessions' memories live on, but
        for a device with a session of a fast path of its own (the CLI's): its publish refreshes that decoder's
        prefix, which the session's answers then read on the default stream without waiting for the lane."""
        devices = {session.placement.vision for session in sessions}
        own_decoders = {session.placement.vision for session in sessions if session.fast}
        streams = []
        with contextlib.ExitStack() as stack:
            for device in devices:
                if device.type != "cuda" or device in own_decoders:
                    continue
                if device not in self._lane_streams:
                    self._lane_streams[device] = torch.cuda.Stream(device, priority=-1)
                streams.append(self._lane_streams[device])
                stack.enter_context(torch.cuda.stream(streams[-1]))
            try:
                yield streams
            finally:
                for stream in streams:  # the tick's work is done on the GPU: its staging buffers may be reused
                    stream.synchronize()

    def _preprocess(self, items, indices):
        """{item: (1, 3, S, S) pixels, or the exception that failed it}: the frames the device path takes in
        groups of one processor, device and size, the others per frame on the host (their own errors)."""
        out, groups = {}, {}
        for i in indices:
            _, session, frame, _ = items[i]
            key = self._device_group(session, frame)
            if key is None:
                continue
            groups.setdefault(key, []).append(i)
        for (_, _, device, _), group in groups.items():
            session = items[group[0]][1]
            try:
                pixels = self._device_pixels(session, [items[i][2] for i in group], device)  # (B, 3, S, S)
            except Exception:  # noqa: BLE001 - the host path then, frame by frame (each its own error)
                continue
            for j, i in enumerate(group):
                out[i] = pixels[j:j + 1]

        def on_host(i):
            name, session, frame, t = items[i]
            return _attempt(lambda: session.preprocess([frame]), name, t)  # (1, 3, S, S)

        rest = [i for i in indices if i not in out]
        out.update(zip(rest, self._map(on_host, rest)))
        return out

    def _device_group(self, session, frame):
        """(processor id, aspect ratio, device, frame shape) when `frame` can be preprocessed on the device, else
        None: the option is off, the tower is not there, the frame is not a uint8 (H, W, 3) array."""
        device = session.placement.vision
        wanted = device.type == "cuda" if self.device_preprocess is None else self.device_preprocess
        processor = session.image_processor
        if not wanted or processor is None or not session._tower_loaded():
            return None
        if not (isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[-1] == 3
                and frame.shape[0] > 0 and frame.shape[1] > 0):
            return None
        aspect = session.model.config.image_aspect_ratio
        key = (id(processor), aspect)
        if key not in self._preprocessors:
            from ..extraction.preprocess import DevicePreprocessor

            try:
                self._preprocessors[key] = DevicePreprocessor(processor, aspect)
            except (ValueError, AttributeError, TypeError):  # not a processor it reproduces: the host path
                self._preprocessors[key] = None
        if self._preprocessors[key] is None:
            return None
        return key + (device, frame.shape)

    def _device_pixels(self, session, frames, device):
        """uint8 frames of one size -> (B, 3, S, S) fp32 pixels on `device`: one copy (pinned on CUDA), one call."""
        b, (h, w, _) = len(frames), frames[0].shape
        if device.type == "cuda":
            staging = self._staging.get((h, w))
            if staging is None or staging.shape[0] < b:
                staging = torch.empty((max(b, 2 * (0 if staging is None else staging.shape[0])), h, w, 3),
                                      dtype=torch.uint8, pin_memory=True)
                self._staging[(h, w)] = staging
            np.stack(frames, out=staging.numpy()[:b])  # the previous tick's upload is done (synchronised)
            host = staging[:b]
        else:
            host = torch.from_numpy(np.stack(frames))  # (B, H, W, 3)
        preprocessor = self._preprocessors[(id(session.image_processor), session.model.config.image_aspect_ratio)]
        return preprocessor(host.to(device, non_blocking=True))  # (B, 3, S, S)

    def _map(self, call, indices):
        """[call(i) for i in indices], on the preprocessing threads when there are several."""
        if len(indices) < 2 or self.preprocess_threads < 2:
            return [call(i) for i in indices]
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.preprocess_threads,
                                                               thread_name_prefix="frame preprocessing")
            # every thread now, not one more under a later load: the process's thread count does not drift
            # (tests/serve/test_server_soak.py)
            barrier = threading.Barrier(self.preprocess_threads)
            for started in [self._pool.submit(barrier.wait, 10.0) for _ in range(self.preprocess_threads)]:
                started.result()
        return list(self._pool.map(call, indices))

    def close(self):
        """Stop the preprocessing threads (idle ones end with the process anyway)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    @torch.inference_mode()
    def _encode(self, items, pixels, indices):
        """One CLIP forward per group of sessions with the same model and vision path -> {item: (1, 256, D)}."""
        groups = {}
        for i in indices:
            session = items[i][1]
            groups.setdefault((id(session.model), session.fast), []).append(i)
        out = {}
        for key, group in groups.items():
            first = items[group[0]][1]
            try:
                if key not in self._encoders:
                    self._encoders[key] = (first.model, first.batch_encoder())
                # host-preprocessed frames beside device ones (an odd frame of a tick): all on the tower's device
                device = first.placement.vision
                features = self._encoders[key][1](torch.cat([pixels[i].to(device) for i in group]))  # (B, 256, D)
            except Exception:  # noqa: BLE001 - find the items that fail: each alone
                for i in group:
                    name, session, _, t = items[i]
                    out[i] = _attempt(lambda: session.encode_pixels(pixels[i]), name, t)
                continue
            for j, i in enumerate(group):
                out[i] = features[j:j + 1]
        return out

    @torch.inference_mode()
    def _remember(self, items, features, indices):
        """Each group of memories that can share a stack updated at once, then read and published."""
        results, groups = {}, {}
        for i in indices:
            name, session, _, t = items[i]
            try:
                x, times = session.prepare_features(features[i], [t])  # (1, 256, D) on the memory's device
            except Exception as error:  # noqa: BLE001 - this item fails alone
                results[i] = _named(error, name, t)
                continue
            memory = session.memory
            stack = memory.stack
            dtype = x.dtype if stack is None else stack.dtype
            key = (memory._config_key, str(x.device), dtype, id(memory.attention_model))
            groups.setdefault(key, []).append((i, x, times[0]))
        for key, group in groups.items():
            sessions = [items[i][1] for i, _, _ in group]
            memories = [s.memory for s in sessions]
            try:
                stack = self._stacks.get(key)
                if stack is None:
                    first = memories[0]
                    stack = MemoryStack(first.config, group[0][1].device, key[2], first.attention_model,
                                        capacity=len(group))
                    self._stacks[key] = stack
                for memory in memories:
                    memory.join(stack)
                stack.update(memories, torch.cat([x for _, x, _ in group]), [t for _, _, t in group])
                tokens, described = stack.read(memories), stack.describe(memories)
            except Exception as error:  # noqa: BLE001 - the group's update failed: every item of it
                for i, _, t in group:
                    results[i] = _named(error, items[i][0], t)
                continue
            for (i, _, t), session, mine, about in zip(group, sessions, tokens, described):
                results[i] = _attempt(lambda: _published(session._publish(t, mine, about)), items[i][0], t)
        return results


def _published(snapshot):
    """A snapshot made on the lane's stream: its tokens are read on the default stream (answers), so their block
    goes back to the lane's allocator only once the work queued there by then is done."""
    tokens = snapshot.tokens
    if tokens.is_cuda and torch.cuda.current_stream(tokens.device) != torch.cuda.default_stream(tokens.device):
        tokens.record_stream(torch.cuda.default_stream(tokens.device))
    return snapshot


def _passed(outcomes, indices, results):
    """The items of `indices` whose outcome is not an exception; a failed item's exception goes to `results`."""
    passed = []
    for i in indices:
        if isinstance(outcomes[i], BaseException):
            results[i] = outcomes[i]
        else:
            passed.append(i)
    return passed


def _named(error, name, t):
    if name is None:
        return error
    named = FrameError(f"session {name!r}, frame at {t:g} s: {type(error).__name__}: {error}")
    named.__cause__ = error
    return named


def _attempt(call, name=None, t=None):
    """call() or the exception it raised (named after the session when `name` is given)."""
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - handed back as this item's result
        return _named(error, name, t)
