"""Batched ingest: one engine tick's frames, one from each of many sessions, as one CLIP batch and one
STAR memory update.

`IngestBatcher.ingest` takes (name, session, frame, timestamp) items and runs, for all of them at once:
  1. preprocessing, per frame, on a few threads (a frame that is not an image fails its own item only);
  2. one CLIP forward per group of sessions that share a model and a vision path (the fast path's
     `FastVisionEncoder` on CUDA, the tower's own modules otherwise): `StreamSession.batch_encoder`;
  3. one `MemoryStack.update` per group of memories of one config, device, dtype and Semantic Attention:
     the batcher keeps one stack per group, and a session's memory joins it at its first batched frame;
  4. one read of every memory's tokens and one device-to-host copy of their timestamps, then each session
     publishes its snapshot.
A session's memory then holds exactly what it would hold fed alone (`StreamSession.add_frame`): a lone memory
runs the same batched update with a batch of one. The CLIP features are equal too without the fast path on CPU
(the patch embedding runs frame by frame there); the fast path's batched CLIP path is compiled and rounds
differently from its one-frame CUDA graph (see `FastVisionEncoder`), as a batched GPU product may.

Sessions that are not `StreamSession`s (anything with `add_frame`) are fed one at a time.
"""

import concurrent.futures
import threading

import torch

from ..model.memory import MemoryStack
from .session import StreamSession


class FrameError(ValueError):
    """A session's frame could not be ingested; the message names the session and the frame."""


class IngestBatcher:
    """The shared memory stacks of an engine's sessions, and the batched ingest of a tick's frames."""

    def __init__(self, preprocess_threads=8):
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

        def preprocess(i):
            name, session, frame, t = items[i]
            return _attempt(lambda: session.preprocess([frame]), name, t)  # (1, 3, S, S)

        pixels = dict(zip(batched, self._map(preprocess, batched)))
        ready = _passed(pixels, batched, results)
        features = self._encode(items, pixels, ready)
        for i, result in self._remember(items, features, _passed(features, ready, results)).items():
            results[i] = result
        return results

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
                features = self._encoders[key][1](torch.cat([pixels[i] for i in group]))  # (B, 256, D)
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
                results[i] = _attempt(lambda: session._publish(t, mine, about), items[i][0], t)
        return results


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
