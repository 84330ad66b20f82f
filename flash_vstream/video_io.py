"""Reading videos and images: the one place decoded media comes in (feature files: features.py).

Videos are sampled by presentation time, not by frame count: sample k is the frame on screen
at `t_k = start + k / fps` seconds (the last frame whose timestamp is <= t_k; the first frame
stands for any time before it). Timestamps are seconds from the stream's start time, so a
variable-frame-rate file and a constant-rate one of the same content give the same samples.
Frames come out as uint8 RGB (H, W, 3) whatever the pixel format, with the container's
rotation applied, one at a time: a 3-hour video is never held in memory.
"""

import collections
import itertools
import logging
import math
import os
from bisect import bisect_right

import numpy as np

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".flv", ".mpg", ".mpeg",
                    ".wmv", ".3gp", ".ts", ".mts", ".gif")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
BACKENDS = ("pyav", "decord")

# A frame whose timestamp is within this of a sample time counts as on screen at that time.
# decord reports float32 seconds (0.1 -> 0.10000000149); without the slack the two backends
# would pick different frames at exact boundaries. Far below any real frame interval.
TIME_EPS = 1e-4
URL_TIMEOUT_S = 30.0


class VideoReadError(RuntimeError):
    """A video or image could not be read; the message names the file and the reason."""


def _ext(path):
    return os.path.splitext(str(path))[1].lower()


def is_video_path(path):
    return _ext(path) in VIDEO_EXTENSIONS


def is_image_path(path):
    return _ext(path) in IMAGE_EXTENSIONS


def is_url(path):
    return "://" in str(path)


# ----------------------------------------------------------------------------- images

def load_image(path):
    """An image file -> uint8 RGB array (H, W, 3), EXIF orientation applied."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise VideoReadError(f"{path}: file not found") from None
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError)
        raise VideoReadError(f"{path}: cannot read image: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- sampling

def rotate_frame(frame, rotation):
    """Apply a display rotation (degrees counter-clockwise, as FFmpeg's display matrix and PyAV's
    `VideoFrame.rotation` give it) to an (H, W, 3) array. Multiples of 90 only."""
    k = int(round(rotation / 90.0)) % 4
    if k == 0:
        return frame
    return np.ascontiguousarray(np.rot90(frame, k=k))  # (W, H, 3) for 90/270


def _sample_time(k, start, fps):
    # computed afresh from k (no accumulated float drift over hours)
    return start + k / fps


def _check_args(fps, start, end):
    if fps is not None and not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number or None (every frame), got {fps!r}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if end is not None and end < start:
        raise ValueError(f"end ({end}) is before start ({start})")


def iter_frames(path, fps=1.0, backend="pyav", start=0.0, end=None, timeout=URL_TIMEOUT_S,
                allow_truncated=False, threads=0, sparse=True):
    """Yield (frame uint8 (H, W, 3) RGB, timestamp seconds) sampled at `fps` from a video.

    `fps=None` yields every frame at its own timestamp. Samples run from `start` to the last
    frame's timestamp, or to `end` (inclusive) when given: a stream cut at a question time.
    A video shorter than one sample period gives its first frame. `backend` is "pyav" or
    "decord". `timeout` (seconds) bounds each network wait for a URL; `threads` is the
    decoder's thread count (0: one per core; fewer when several files decode at once). A frame on screen at
    several sample times is yielded as the same array: treat frames as read-only. With `sparse`
    (PyAV, `fps` set) only the frames a sample time can show are decoded in full (`_sparse_frames`);
    the samples are the same as decoding every frame (`sparse=False`).

    Raises VideoReadError naming the file when it is missing, empty, not a video, fails to
    decode, or is truncated (frames stop well before the declared duration; the error comes
    after the frames that could be read, unless `allow_truncated`).
    """
    _check_args(fps, start, end)
    if backend == "pyav":
        return _iter_pyav(path, fps, start, end, timeout, allow_truncated, threads, sparse)
    if backend == "decord":
        return _iter_decord(path, fps, start, end, timeout, allow_truncated, threads)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def read_frames(path, fps=1.0, backend="pyav", start=0.0, end=None, timeout=URL_TIMEOUT_S,
                allow_truncated=False, threads=0, sparse=True):
    """All samples at once: (uint8 array (T, H, W, 3), list of T timestamps). For short clips;
    use `iter_frames` for long videos."""
    frames, times = [], []
    for frame, t in iter_frames(path, fps=fps, backend=backend, start=start, end=end, timeout=timeout,
                                allow_truncated=allow_truncated, threads=threads, sparse=sparse):
        frames.append(frame)
        times.append(t)
    return np.stack(frames), times


def _open_pyav(path, timeout):
    import av

    if not is_url(path) and not os.path.exists(path):
        raise VideoReadError(f"{path}: file not found")
    if not is_url(path) and os.path.getsize(path) == 0:
        raise VideoReadError(f"{path}: file is empty")
    try:
        container = av.open(str(path), timeout=timeout if is_url(path) else None)
    except Exception as e:
        raise VideoReadError(f"{path}: cannot open: {type(e).__name__}: {e}") from e
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: no video stream")
    return container


def _stream_origin(stream):
    """Stream start in seconds (None when the container does not say)."""
    if stream.start_time is None or stream.time_base is None:
        return None
    return float(stream.start_time * stream.time_base)


def _iter_pyav(path, fps, start, end, timeout, allow_truncated=False, threads=0, sparse=True):
    container = _open_pyav(path, timeout)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threads; decoding is the CPU cost of extraction
        stream.codec_context.thread_count = threads  # 0: FFmpeg picks (about one per core)
        origin = _stream_origin(stream)
        if start > 0:
            try:
                # backward to the keyframe at or before `start`: the frame on screen at `start`
                # is decoded on the way
                offset = (origin or 0.0) + start
                container.seek(int(offset / stream.time_base), backward=True, any_frame=False, stream=stream)
            except Exception as e:
                logger.warning("%s: seek to %.3fs failed (%s); decoding from the beginning", path, start, e)
                container.seek(0)
        if sparse and fps is not None and origin is not None:
            decoded = _sparse_frames(path, container, stream, fps, start, end, origin)
        else:
            decoded = _decoded_frames(path, container, stream)
        yield from _sample_stream(path, decoded, fps, start, end, origin, _declared_duration(container, stream),
                                  allow_truncated, threads)
    finally:
        container.close()


def _declared_duration(container, stream):
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1e6
    return None


def _decoded_frames(path, container, stream):
    """(av.VideoFrame, seconds or None) in presentation order; decoder errors -> VideoReadError."""
    it = container.decode(stream)
    while True:
        try:
            frame = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise VideoReadError(f"{path}: decoding failed: {type(e).__name__}: {e}") from e
        yield frame, (None if frame.pts is None or frame.time_base is None else float(frame.pts * frame.time_base))


# Frames in flight between a packet's position in decode order and in presentation order: H.264/HEVC
# reorder at most 16 pictures (the largest decoded picture buffer), so a frame's presentation successor
# is among the next REORDER packets. LOOKAHEAD packets are held so that a keyframe and the pictures
# reordered around it are seen before the packets leading to it are dropped.
REORDER = 16
LOOKAHEAD = 64


def _sparse_frames(path, container, stream, fps, start, end, origin):
    """What `_decoded_frames` yields minus frames no sample time shows: the same samples, less decoding.

    Packets are read LOOKAHEAD ahead. A packet is *needed* when a sample time falls between its
    timestamp and the next timestamp after it (the frame is on screen then; conservative: an unknown
    successor or timestamp counts as needed). Needed packets decode in full. A run of unneeded packets
    that ends at a keyframe, whose reordered leading pictures are unneeded too, is dropped without
    decoding (what a seek to that keyframe would do, without the index lookup: demuxing is cheap).
    Other unneeded packets decode with `skip_frame = "NONREF"`: reference frames are still decoded
    (later frames build on them), non-reference ones are skipped.
    """
    ctx = stream.codec_context
    tb = stream.time_base
    packets = container.demux(stream)
    window = collections.deque()  # [packet, seconds from origin or None, needed or None (not known yet)]
    exhausted, first_t, drop = False, None, 0

    def is_needed(i):
        entry = window[i]
        if entry[2] is None:
            t = entry[1]
            after = [e[1] for e in itertools.islice(window, i + 1, i + 1 + REORDER)
                     if e[1] is not None and t is not None and e[1] > t]  # RTSP packets may come without a time
            if t is None or t <= first_t + TIME_EPS or not after:
                entry[2] = True  # unknown time, the first frame (it stands for earlier times) or no successor seen
            else:
                k = max(0, math.ceil((t - 2 * TIME_EPS - start) * fps))
                tk = _sample_time(k, start, fps)
                # past `end`, the next frame ends the sampling: decode it
                entry[2] = (end is not None and tk > end + TIME_EPS) or tk <= min(after) + TIME_EPS
        return entry[2]

    def droppable_run():
        """Packets from the head up to the next keyframe, when all can go; else 0."""
        for j in range(1, len(window) - 2 * REORDER):
            if is_needed(j - 1):
                return 0
            if window[j][0].is_keyframe:
                key_t = window[j][1]
                if key_t is None or any(window[i][1] is None or (window[i][1] < key_t and is_needed(i))
                                        for i in range(j + 1, j + 1 + REORDER)):
                    return 0  # a leading picture (before the keyframe on screen) that a sample shows
                return j
        return 0

    while True:
        while not exhausted and len(window) < LOOKAHEAD:
            try:
                packet = next(packets)
            except StopIteration:
                exhausted = True
                break
            except Exception as e:
                raise VideoReadError(f"{path}: demuxing failed: {type(e).__name__}: {e}") from e
            t = None if packet.pts is None else float(packet.pts * tb) - origin
            window.append([packet, t, None if packet.size else True])  # size 0: the flush packet
        if not window:
            return
        if first_t is None:
            first_t = min((e[1] for e in window if e[1] is not None), default=math.inf)
        if drop == 0:
            drop = droppable_run()
        if drop:
            window.popleft()
            drop -= 1
            continue
        ctx.skip_frame = "DEFAULT" if is_needed(0) else "NONREF"
        packet = window.popleft()[0]
        try:
            frames = ctx.decode(packet)
        except Exception as e:
            raise VideoReadError(f"{path}: decoding failed: {type(e).__name__}: {e}") from e
        for frame in frames:
            yield frame, (None if frame.pts is None or frame.time_base is None
                          else float(frame.pts * frame.time_base))


def _rgb_converter(first, threads=0):
    """Frame -> uint8 RGB (H, W, 3) at the first frame's size (a mid-stream resolution change
    still stacks), with the first frame's display rotation applied. One reformatter for the stream,
    with `threads` swscale threads (0: one per core): `frame.to_ndarray` would build a converter and a
    pool of one thread per core for every frame (the same pixels, bit for bit, at a multiple of the CPU
    time when many decoders share the cores)."""
    from av.video.reformatter import VideoReformatter

    width, height, rotation = first.width, first.height, first.rotation or 0
    reformatter, options = VideoReformatter(), {"threads": threads}

    def convert(frame):
        try:
            rgb = reformatter.reformat(frame, width=width, height=height, format="rgb24", **options)
        except TypeError:  # an older PyAV without `threads` (its converter has one thread)
            if not options:
                raise
            options.clear()
            rgb = reformatter.reformat(frame, width=width, height=height, format="rgb24")
        return rotate_frame(rgb.to_ndarray(), rotation)

    return convert


def _sample_stream(path, decoded, fps, start, end, origin, declared_duration, allow_truncated, threads=0):
    """The sampling rule over (frame, seconds) in presentation order; `_sample_indices` is the
    same rule for a reader that knows every timestamp up front (decord). `threads`: the RGB converter's."""
    convert = None
    current = current_rgb = current_t = None  # the frame on screen, converted lazily, its time
    k = n_frames = 0
    for frame, t in decoded:
        n_frames += 1
        if convert is None:
            convert = _rgb_converter(frame, threads)
            origin = (t or 0.0) if origin is None else origin
        # a missing timestamp: assume 30 fps spacing after the previous frame
        t = (current_t + 1.0 / 30 if current_t is not None else 0.0) if t is None else t - origin
        if fps is None:  # every frame at its own time
            if end is not None and t > end + TIME_EPS:
                break
            if t >= start - TIME_EPS:
                yield convert(frame), t
                k += 1
            current_t = t
            continue
        if current is not None:
            # every sample time before this frame's timestamp shows `current`
            while True:
                tk = _sample_time(k, start, fps)
                if end is not None and tk > end + TIME_EPS:
                    break
                if tk + TIME_EPS >= t:
                    break
                if current_rgb is None:  # a frame shown at several sample times is converted once
                    current_rgb = convert(current)
                yield current_rgb, tk
                k += 1
            if end is not None and _sample_time(k, start, fps) > end + TIME_EPS:
                break
        current, current_rgb, current_t = frame, None, t
    else:
        # end of stream: the last frame is on screen at sample times up to its own timestamp;
        # the first sample always exists, so a video shorter than one period gives its first frame
        while fps is not None and current is not None:
            tk = _sample_time(k, start, fps)
            if (end is not None and tk > end + TIME_EPS) or (tk > current_t + TIME_EPS and (k > 0 or start > 0)):
                break
            if current_rgb is None:
                current_rgb = convert(current)
            yield current_rgb, tk
            k += 1
    if n_frames == 0:
        raise VideoReadError(f"{path}: no decodable video frames")
    if k == 0:
        raise VideoReadError(f"{path}: no frames in the requested range (start={start}s, end={end}s; "
                             f"last frame at {current_t:.3f}s)")
    _check_complete(path, current_t, declared_duration, end, allow_truncated)


def _check_complete(path, last_t, declared_duration, end, allow_truncated):
    """A file whose frames stop well before its declared duration (or before `end`) is
    truncated: an error, unless `allow_truncated` (then a warning)."""
    expected = declared_duration if end is None or not declared_duration else min(end, declared_duration)
    if expected and last_t < 0.9 * expected - 1.0:
        message = f"{path}: truncated: frames stop at {last_t:.1f}s of a declared {declared_duration:.1f}s"
        if not allow_truncated:
            raise VideoReadError(message + " (allow_truncated=True reads what is there)")
        logger.warning(message)


def _import_decord():
    try:
        import decord
    except ImportError:
        try:
            import decord2 as decord
        except ImportError:
            raise ImportError("backend='decord' needs the decord (or decord2) package") from None
    return decord


def _sample_indices(times, fps, start, end):
    """Indices into frames with start times `times` (sorted, relative seconds) and sample times."""
    if fps is None:
        picks = [(i, t) for i, t in enumerate(times)
                 if t >= start - TIME_EPS and (end is None or t <= end + TIME_EPS)]
        return [i for i, _ in picks], [t for _, t in picks]
    indices, sample_times = [], []
    last = times[-1]
    k = 0
    while True:
        tk = _sample_time(k, start, fps)
        if (k > 0 or start > 0) and tk > last + TIME_EPS:
            break
        if end is not None and tk > end + TIME_EPS:
            break
        indices.append(max(bisect_right(times, tk + TIME_EPS) - 1, 0))
        sample_times.append(tk)
        k += 1
    return indices, sample_times


def _iter_decord(path, fps, start, end, timeout, allow_truncated=False, threads=0, batch=16):
    decord = _import_decord()
    # PyAV opens the file first: it gives the rotation and a readable error for a corrupt file
    # (decord 0.6 can abort the process on some broken inputs).
    container = _open_pyav(path, timeout)
    try:
        first = next(_decoded_frames(path, container, container.streams.video[0]), None)
        if first is None:
            raise VideoReadError(f"{path}: no decodable video frames")
        rotation = first[0].rotation or 0
        declared = _declared_duration(container, container.streams.video[0])
    finally:
        container.close()
    if rotation:
        # decord 0.6 returns a garbled 4-channel image for 90-degree rotations; PyAV is exact
        logger.info("%s: rotated video (%d deg); decoding with PyAV instead of decord", path, rotation)
        yield from _iter_pyav(path, fps, start, end, timeout, allow_truncated, threads)
        return
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads)
        n = len(reader)
        # (n, 2) start/end seconds from the stream start, float32
        times = [float(t) for t in reader.get_frame_timestamp(list(range(n)))[:, 0]] if n else []
    except Exception as e:
        raise VideoReadError(f"{path}: decord cannot open: {type(e).__name__}: {e}") from e
    if n == 0:
        raise VideoReadError(f"{path}: no decodable video frames")
    _check_complete(path, times[-1], declared, end, allow_truncated)
    indices, sample_times = _sample_indices(times, fps, start, end)
    if not indices:
        raise VideoReadError(f"{path}: no frames in the requested range (start={start}s, end={end}s, "
                             f"last frame at {times[-1]:.3f}s)")
    for lo in range(0, len(indices), batch):
        chunk = indices[lo:lo + batch]
        try:
            frames = reader.get_batch(chunk).asnumpy()  # (b, H, W, 3) uint8 RGB
        except Exception as e:
            raise VideoReadError(f"{path}: decord decoding failed: {type(e).__name__}: {e}") from e
        for frame, t in zip(frames, sample_times[lo:lo + batch]):
            yield frame, t
