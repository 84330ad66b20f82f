"""Frame sources for the realtime CLI: a video file, a camera, a network stream, or synthetic noise.

A source yields (uint8 RGB frame (H, W, 3), stream seconds) at `video_fps`, lazily. Pacing to the
wall clock is the shell's job, not the source's. Each source says whether it is `live`: a live
source (camera, network stream) produces frames on its own clock, so when the frame handler lags
the shell drops the oldest queued frames; a file or synthetic source waits for the handler
instead, so a scripted run ingests every frame and gives the same answers every time.

`--video-source` accepts: a camera index (`0`) or device path (`/dev/video0`), a URL
(`rtsp://`, `rtmp://`, `http(s)://`, `udp://`, `.m3u8` for HLS; read with PyAV/FFmpeg), or
`synthetic[:WxH]` (seeded random frames, for tests and benchmarks).
"""

import dataclasses
import math
import os
import sys

import numpy as np

from ..video_io import URL_TIMEOUT_S, VideoReadError, is_url, iter_frames, rotate_frame


@dataclasses.dataclass
class FrameSource:
    kind: str  # "file" | "url" | "camera" | "synthetic"
    name: str
    live: bool
    _open: callable = dataclasses.field(repr=False, default=None)
    max_frames: int | None = None

    def frames(self):
        """A generator of (frame, seconds); closing it releases the file or device."""
        produced = 0
        if self.max_frames is not None and self.max_frames <= 0:
            return
        frames = self._open()
        try:
            for item in frames:
                yield item
                produced += 1
                if self.max_frames is not None and produced >= self.max_frames:
                    return
        finally:
            frames.close()

    def describe(self):
        return f"{self.kind} {self.name}" + (" (live)" if self.live else "")


def open_source(video_file=None, video_source=None, video_fps=1.0, start=0.0, end=None, max_frames=None,
                backend="pyav", seed=0):
    """Build the `FrameSource` for the CLI's `--video-file` / `--video-source`."""
    if (video_file is None) == (video_source is None):
        raise ValueError("give exactly one of --video-file and --video-source")
    if not (video_fps > 0 and math.isfinite(video_fps)):
        raise ValueError(f"video_fps must be a positive number, got {video_fps}")
    if video_file is not None:
        if is_url(video_file):
            video_source = video_file
        else:
            if not os.path.exists(video_file):
                raise VideoReadError(f"{video_file}: file not found")
            return FrameSource("file", video_file, live=False, max_frames=max_frames,
                               _open=lambda: iter_frames(video_file, fps=video_fps, backend=backend, start=start,
                                                         end=end))
    spec = str(video_source)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        width, height = _parse_size(spec.partition(":")[2] or "64x64")
        return FrameSource("synthetic", f"{width}x{height}", live=False, max_frames=max_frames,
                           _open=lambda: synthetic_frames(width, height, video_fps, seed=seed, start=start, end=end))
    if is_url(spec):
        return FrameSource("url", spec, live=True, max_frames=max_frames,
                           _open=lambda: iter_frames(spec, fps=video_fps, backend="pyav", start=start, end=end,
                                                     allow_truncated=True))
    if spec.isdigit() or spec.startswith("/dev/"):
        return FrameSource("camera", spec, live=True, max_frames=max_frames,
                           _open=lambda: camera_frames(spec, video_fps, end=end))
    if os.path.exists(spec):  # a file given as --video-source: play it like --video-file
        return open_source(video_file=spec, video_fps=video_fps, start=start, end=end, max_frames=max_frames,
                           backend=backend)
    raise ValueError(f"--video-source {spec!r}: expected a camera index or /dev path, a URL, or synthetic[:WxH]")


def _parse_size(text):
    try:
        width, height = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"synthetic size must look like 64x48, got {text!r}") from None
    if width < 1 or height < 1:
        raise ValueError(f"synthetic size must be positive, got {text!r}")
    return width, height


def synthetic_frames(width, height, fps, seed=0, start=0.0, end=None):
    """Endless seeded random frames at `fps` (up to `end` seconds): a source with no decoder cost."""
    rng = np.random.default_rng(seed)
    k = 0
    while True:
        t = start + k / fps
        if end is not None and t > end + 1e-9:
            return
        yield rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), t
        k += 1


def _camera_input(spec):
    """(PyAV input name, format) for a camera index or device path on this platform."""
    if sys.platform.startswith("linux"):
        return (f"/dev/video{spec}" if spec.isdigit() else spec), "v4l2"
    if sys.platform == "darwin":
        return spec, "avfoundation"
    if sys.platform.startswith("win"):
        return (f"video={spec}" if not spec.startswith("video=") else spec), "dshow"
    raise VideoReadError(f"camera {spec}: no capture backend known for platform {sys.platform}")


def camera_frames(spec, fps, end=None, timeout=URL_TIMEOUT_S):
    """Frames from a capture device, sampled at `fps` by capture time (the newest frame once each
    sampling period; periods the device skipped are not repeated). Seconds from the first frame."""
    import av

    name, fmt = _camera_input(spec)
    try:
        container = av.open(name, format=fmt, timeout=timeout)
    except Exception as e:
        raise VideoReadError(f"camera {spec}: cannot open {name} ({fmt}): {type(e).__name__}: {e}") from e
    try:
        stream = container.streams.video[0]
        origin = None
        next_t = 0.0
        for frame in container.decode(stream):
            t = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base is not None else None
            if t is None:
                continue
            origin = t if origin is None else origin
            t -= origin
            if end is not None and t > end:
                return
            if t + 1e-6 < next_t:
                continue
            next_t = (math.floor(t * fps + 1e-6) + 1) / fps
            rgb = frame.to_ndarray(format="rgb24")
            yield rotate_frame(rgb, frame.rotation or 0), t
    except VideoReadError:
        raise
    except Exception as e:
        raise VideoReadError(f"camera {spec}: capture failed: {type(e).__name__}: {e}") from e
    finally:
        container.close()
