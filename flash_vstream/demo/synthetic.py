"""Synthetic long streams with exactly known answers: the demo's data and its memory benchmark.

A stream is a sequence of scenes sampled at 1 fps (frame k is shown at t = k s). A scene is a
background colour that fills most of the frame plus a few small shapes (circle / square /
triangle) drifting inside their own quadrant, so no shape ever hides another. The vocabulary is
tiny (6 colours, 3 shapes) so a small randomly initialised model can learn it.

Each question is asked at a stream time t and sees frames [0, t] only. The families
(`answer_type`) need different memories:

    spatial   what is on screen now                                 -> spatial memory
    start     what was shown at the start, long gone from the screen -> temporal / abstract
    order     which of two things came first                        -> temporal (time-sorted)
    longest   background of the strictly longest scene (not current)-> largest cluster / retrieved
    appeared  did X appear (yes / no, balanced)                     -> temporal / abstract

Files written by `generate_dataset` (all paths relative to the output folder):

    videos/<split>/<split>_NNNN.mp4   h264 (or mpeg4) at 1 fps, frame k has pts k s
    <split>_qa.json      eval format: {video_id, question, id, answer, answer_type, duration,
                         time, video}; `time` is the question time in s, `duration` the stream's
    <split>_streams.json the scene specs (ground truth for plots and checks)
    pretrain.json        stage 1, LLaVA format, plain captions of frames [0, time]
    finetune.json        stage 2, LLaVA format, one QA turn about frames [0, time]
    corpus.txt           every generated sentence, for training the tokenizer
    meta.json            the settings and counts; a rerun with the same settings reuses the data

Training records carry `"time": t`, meaning "use the first t + 1 frames of the video".
"""

from __future__ import annotations

import argparse
import itertools
import json
import time as _time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import av
import numpy as np

from flash_vstream.constants import DEFAULT_IMAGE_TOKEN

FPS = 1  # the model samples streams at video_fps = 1; frame k is displayed at t = k s
SPLITS = ("train", "test")
FAMILIES = ("spatial", "start", "order", "longest", "appeared")

# Far apart in RGB so that a frame's mean colour alone tells the background apart.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "cyan": (40, 205, 220),
}
SHAPES = ("circle", "square", "triangle")

# Shape geometry in units of the frame side. A shape of half-size s stays inside the box
# [-s, s]^2 around its centre, and each shape owns one quadrant of the frame, so shapes never
# overlap; with s <= 0.13 three shapes cover at most ~16 % of the frame.
SHAPE_SIZE = (0.09, 0.13)
MAX_SPEED = 0.02  # per frame and axis: about 1.3 px at 64 px, so motion is a drift, not a jump
NUM_CELLS = 4  # quadrants, row-major: top-left, top-right, bottom-left, bottom-right

IntRange = Union[int, Sequence[int]]


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    color: str  # one of COLORS, never the scene's background
    cell: int  # quadrant it moves in, 0..3 row-major
    size: float  # half-size, in frame sides
    x: float  # centre at the scene's first frame, in frame sides
    y: float
    vx: float  # drift per frame, in frame sides
    vy: float

    def bounds(self) -> tuple[float, float, float, float]:
        """(x_lo, x_hi, y_lo, y_hi) the centre moves in, keeping the shape inside its cell."""
        col, row = self.cell % 2, self.cell // 2
        return (0.5 * col + self.size, 0.5 * col + 0.5 - self.size,
                0.5 * row + self.size, 0.5 * row + 0.5 - self.size)

    def positions(self, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centre at the given frame indices within the scene; bounces off the cell's walls."""
        x_lo, x_hi, y_lo, y_hi = self.bounds()
        return (_bounce(self.x + self.vx * local, x_lo, x_hi),
                _bounce(self.y + self.vy * local, y_lo, y_hi))


def _bounce(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    span = hi - lo
    u = np.mod(p - lo, 2 * span)  # a triangle wave: reflect at lo and hi
    return lo + np.where(u > span, 2 * span - u, u)


@dataclass(frozen=True)
class Scene:
    background: str
    duration: int  # frames (= seconds at 1 fps)
    shapes: tuple[Shape, ...] = ()


@dataclass(frozen=True)
class StreamSpec:
    id: str
    frame_size: int
    scenes: tuple[Scene, ...]

    @property
    def length(self) -> int:
        """Number of frames (= duration in seconds at 1 fps)."""
        return sum(s.duration for s in self.scenes)

    @property
    def starts(self) -> list[int]:
        """First frame of each scene."""
        return list(itertools.accumulate([0] + [s.duration for s in self.scenes[:-1]]))

    def scene_index(self, t: int) -> int:
        if not 0 <= t < self.length:
            raise ValueError(f"time {t} outside stream {self.id} of {self.length} frames")
        end = 0
        for i, scene in enumerate(self.scenes):
            end += scene.duration
            if t < end:
                return i
        raise AssertionError("unreachable")

    def scene_at(self, t: int) -> Scene:
        return self.scenes[self.scene_index(t)]

    def observed(self, t: int) -> list[tuple[Scene, int]]:
        """The scenes seen in frames [0, t], each with the number of its frames seen."""
        last = self.scene_index(t)
        starts = self.starts
        seen = [(s, s.duration) for s in self.scenes[:last]]
        return seen + [(self.scenes[last], t - starts[last] + 1)]

    def to_dict(self) -> dict:
        return {"id": self.id, "frame_size": self.frame_size, "length": self.length,
                "starts": self.starts, "scenes": [asdict(s) for s in self.scenes]}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamSpec":
        scenes = tuple(Scene(s["background"], s["duration"], tuple(Shape(**sh) for sh in s["shapes"]))
                       for s in d["scenes"])
        return cls(d["id"], d["frame_size"], scenes)


@dataclass(frozen=True)
class Question:
    id: str
    video_id: str
    time: int  # the stream is observed up to and including frame `time`
    family: str  # answer_type
    question: str
    answer: str


@dataclass(frozen=True)
class SyntheticConfig:
    """What a stream and its questions look like. Ranges are inclusive, in frames (= s)."""

    stream_length: tuple[int, int] = (40, 80)
    scene_duration: tuple[int, int] = (4, 16)
    shapes_per_scene: tuple[int, int] = (1, 3)
    frame_size: int = 64
    shape_question_ratio: float = 0.3  # share of questions about shapes rather than backgrounds
    min_question_time: int = 8  # earliest question time
    start_gap: int = 10  # `start`: the first scene ended at least this many seconds before t
    longest_margin: int = 2  # `longest`: the longest scene beats every other one by this much

    def __post_init__(self):
        for name in ("stream_length", "scene_duration", "shapes_per_scene"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be an inclusive range lo <= hi, got {(lo, hi)}")
        if self.stream_length[0] < 2 or self.scene_duration[0] < 1:
            raise ValueError("streams need >= 2 frames and scenes >= 1 frame")
        if self.shapes_per_scene[1] > NUM_CELLS:
            raise ValueError(f"at most {NUM_CELLS} shapes per scene (one per quadrant)")
        if self.frame_size < 16 or self.frame_size % 2:
            raise ValueError(f"frame_size must be even (yuv420p) and >= 16, got {self.frame_size}")
        if not 0.0 <= self.shape_question_ratio <= 1.0:
            raise ValueError("shape_question_ratio must be in [0, 1]")
        if self.min_question_time < 0 or self.start_gap < 1 or self.longest_margin < 1:
            raise ValueError("min_question_time >= 0, start_gap >= 1, longest_margin >= 1")


# --------------------------------------------------------------------------- sampling


def _rng(seed: int, split: str, index: int, purpose: int) -> np.random.Generator:
    """One generator per (stream, purpose): stream i is the same whatever the stream count,
    and changing the number of questions does not change the videos."""
    return np.random.default_rng([seed, SPLITS.index(split), index, purpose])


_SPEC, _QUESTIONS, _CAPTIONS = 0, 1, 2


def _r4(x: float) -> float:
    return round(float(x), 4)  # short, exact JSON round trip


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def sample_stream(stream_id: str, rng: np.random.Generator, config: SyntheticConfig) -> StreamSpec:
    """Scenes until the sampled length is filled; the last one is cut at the stream's end."""
    length = int(rng.integers(config.stream_length[0], config.stream_length[1] + 1))
    colors = list(COLORS)
    scenes, total, previous = [], 0, None
    while total < length:
        duration = min(int(rng.integers(config.scene_duration[0], config.scene_duration[1] + 1)),
                       length - total)
        # A new scene always changes the background, so every scene cut is visible.
        background = _pick(rng, [c for c in colors if c != previous])
        num_shapes = int(rng.integers(config.shapes_per_scene[0], config.shapes_per_scene[1] + 1))
        cells = sorted(int(c) for c in rng.permutation(NUM_CELLS)[:num_shapes])
        shapes = []
        for cell in cells:
            size = _r4(rng.uniform(*SHAPE_SIZE))
            col, row = cell % 2, cell // 2
            shapes.append(Shape(
                kind=_pick(rng, SHAPES), color=_pick(rng, [c for c in colors if c != background]),
                cell=cell, size=size,
                x=_r4(rng.uniform(0.5 * col + size, 0.5 * col + 0.5 - size)),
                y=_r4(rng.uniform(0.5 * row + size, 0.5 * row + 0.5 - size)),
                vx=_r4(rng.uniform(-MAX_SPEED, MAX_SPEED)), vy=_r4(rng.uniform(-MAX_SPEED, MAX_SPEED))))
        scenes.append(Scene(background, duration, tuple(shapes)))
        total += duration
        previous = background
    return StreamSpec(stream_id, config.frame_size, tuple(scenes))


# --------------------------------------------------------------------------- rendering


def _shape_mask(shape: Shape, local: np.ndarray, size: int) -> np.ndarray:
    """Pixels covered by the shape at the scene-local frame indices `local`: (n, H, W) bool."""
    centres = (np.arange(size) + 0.5) / size  # pixel centres in frame sides
    xs, ys = shape.positions(local.astype(np.float64))  # (n,), (n,)
    dx = np.abs(centres[None, None, :] - xs[:, None, None])  # (n, 1, W)
    dy = centres[None, :, None] - ys[:, None, None]  # (n, H, 1); image y grows downwards
    s = shape.size
    if shape.kind == "circle":
        return dx * dx + dy * dy <= s * s  # (n, H, W)
    if shape.kind == "square":
        return (dx <= 0.85 * s) & (np.abs(dy) <= 0.85 * s)  # about the circle's area
    if shape.kind == "triangle":  # apex up, base 2s wide at the bottom
        return (dy >= -s) & (dy <= s) & (dx <= (dy + s) / 2)
    raise ValueError(f"unknown shape kind {shape.kind!r}")


def _paint(out: np.ndarray, scene: Scene, local: np.ndarray, size: int) -> None:
    out[:] = COLORS[scene.background]  # (n, H, W, 3)
    for shape in scene.shapes:
        out[_shape_mask(shape, local, size)] = COLORS[shape.color]


def render_stream(spec: StreamSpec) -> np.ndarray:
    """All frames of the stream: (T, H, W, 3) uint8 RGB, frame k shown at t = k s."""
    size = spec.frame_size
    frames = np.empty((spec.length, size, size, 3), np.uint8)
    for scene, start in zip(spec.scenes, spec.starts):
        _paint(frames[start:start + scene.duration], scene, np.arange(scene.duration), size)
    return frames


def render_frame(spec: StreamSpec, t: int) -> np.ndarray:
    """Frame t alone: (H, W, 3) uint8, equal to render_stream(spec)[t]."""
    i = spec.scene_index(t)
    frame = np.empty((1, spec.frame_size, spec.frame_size, 3), np.uint8)
    _paint(frame, spec.scenes[i], np.array([t - spec.starts[i]]), spec.frame_size)
    return frame[0]


# --------------------------------------------------------------------------- mp4


def default_codec() -> str:
    """libx264 when this PyAV build has it, else FFmpeg's own mpeg4 encoder."""
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # PyAV raises UnknownCodecError (a ValueError) or FFmpegError
        return "mpeg4"


def write_mp4(frames: np.ndarray, path: Union[str, Path], fps: int = FPS,
              codec: Optional[str] = None) -> None:
    """Encode (T, H, W, 3) uint8 RGB frames; frame k gets pts k / fps s (no B-frames, so no
    reordering delay or edit list: a PTS-based 1 fps reader sees frame k at t = k s)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    codec = codec or default_codec()
    options = {"bf": "0"}
    if codec == "libx264":
        options.update(preset="ultrafast", crf="10")  # near lossless on flat colours
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # tiny frames; callers parallelise over files
        if codec == "mpeg4":
            stream.bit_rate = 4_000_000  # per second = per frame at 1 fps: near lossless
        for k, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = k  # codec time base is 1/fps
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())  # flush


def read_mp4(path: Union[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """Decode every frame: ((T, H, W, 3) uint8 RGB, (T,) float64 display times in s)."""
    with av.open(str(path)) as container:
        decoded = [(f.to_ndarray(format="rgb24"), float(f.time)) for f in container.decode(video=0)]
    if not decoded:
        raise ValueError(f"no video frames in {path}")
    return np.stack([f for f, _ in decoded]), np.array([t for _, t in decoded])


# --------------------------------------------------------------------------- questions

# A builder gets (spec, t, rng, config, about_shapes, target) and returns (question, answer),
# or None when no unambiguous question of its family can be asked at t.
Builder = Callable[..., Optional[tuple[str, str]]]


def _unique_kinds(scene: Scene) -> list[str]:
    kinds = [s.kind for s in scene.shapes]
    return [k for k in SHAPES if kinds.count(k) == 1]


def _color_of(scene: Scene, kind: str) -> str:
    return next(s.color for s in scene.shapes if s.kind == kind)


def _spatial(spec, t, rng, config, about_shapes, target):
    now = spec.scene_at(t)
    if not about_shapes:
        return "what colour is the background now?", now.background
    kinds = _unique_kinds(now)
    if not kinds:
        return None
    kind = _pick(rng, kinds)
    return f"what colour is the {kind} now?", _color_of(now, kind)


def _start(spec, t, rng, config, about_shapes, target):
    first, now = spec.scenes[0], spec.scene_at(t)
    if t - (first.duration - 1) < config.start_gap:  # long gone from the spatial memory
        return None
    if not about_shapes:
        if now.background == first.background:  # would be answerable from the screen
            return None
        return "what colour was the background at the start?", first.background
    kinds = [k for k in _unique_kinds(first)
             if not any(s.kind == k and s.color == _color_of(first, k) for s in now.shapes)]
    if not kinds:
        return None
    kind = _pick(rng, kinds)
    return f"what colour was the {kind} at the start?", _color_of(first, kind)


def _order(spec, t, rng, config, about_shapes, target):
    first_seen: dict[str, int] = {}  # thing -> index of the first scene showing it
    for i, (scene, _) in enumerate(spec.observed(t)):
        things = [s.kind for s in scene.shapes] if about_shapes else [scene.background]
        for thing in things:
            first_seen.setdefault(thing, i)
    pairs = [(a, b) for a, b in itertools.combinations(first_seen, 2) if first_seen[a] < first_seen[b]]
    if not pairs:
        return None
    earlier, later = _pick(rng, pairs)
    x, y = (earlier, later) if rng.random() < 0.5 else (later, earlier)
    if about_shapes:
        return f"which shape came first, the {x} or the {y}?", earlier
    return f"which background came first, {x} or {y}?", earlier


def _longest(spec, t, rng, config, about_shapes, target):
    # Backgrounds only: a scene is a background span (a temporal cluster of frames).
    seen = spec.observed(t)
    lengths = [n for _, n in seen]
    i = int(np.argmax(lengths))
    if i == len(seen) - 1:  # on screen now: the spatial memory alone would answer
        return None
    if any(n > lengths[i] - config.longest_margin for j, n in enumerate(lengths) if j != i):
        return None
    totals: dict[str, int] = {}
    for scene, n in seen:
        totals[scene.background] = totals.get(scene.background, 0) + n
    answer = seen[i][0].background
    # The answer's colour must also be the one on screen longest in total, so the largest
    # cluster of frames and the longest single scene agree.
    if any(n > totals[answer] - config.longest_margin for c, n in totals.items() if c != answer):
        return None
    return "what colour was the background of the longest scene?", answer


def _appeared(spec, t, rng, config, about_shapes, target):
    seen = spec.observed(t)
    now = seen[-1][0]
    if about_shapes:
        shown = {(s.color, s.kind) for scene, _ in seen for s in scene.shapes}
        on_screen = {(s.color, s.kind) for s in now.shapes}
        options = list(itertools.product(COLORS, SHAPES))
    else:
        shown = {scene.background for scene, _ in seen}
        on_screen = {now.background}
        options = list(COLORS)
    if target == "yes":  # something shown earlier but not on screen now
        pool = [o for o in options if o in shown and o not in on_screen]
    else:  # never shown up to t (it may still appear later in the stream)
        pool = [o for o in options if o not in shown]
    if not pool:
        return None
    pick = _pick(rng, pool)
    thing = f"{pick[0]} {pick[1]}" if about_shapes else f"{pick} background"
    return f"did a {thing} appear?", target


BUILDERS: dict[str, Builder] = {
    "spatial": _spatial, "start": _start, "order": _order, "longest": _longest,
    "appeared": _appeared,
}
_HAS_SHAPE_VARIANT = {"spatial", "start", "order", "appeared"}


def make_questions(spec: StreamSpec, num_questions: int, rng: np.random.Generator,
                   config: SyntheticConfig, families: Sequence[str] = FAMILIES) -> list[Question]:
    """Questions cycling through `families`, each at a random time where it is unambiguous.

    `appeared` answers alternate yes / no within a stream (random start), so they are
    balanced overall. A family that has no valid time in this stream is skipped.
    """
    for family in families:
        if family not in BUILDERS:
            raise ValueError(f"unknown question family {family!r}; choose from {FAMILIES}")
    times = np.arange(min(config.min_question_time, spec.length - 1), spec.length)
    offset = int(rng.integers(len(families)))
    next_yes = bool(rng.random() < 0.5)
    questions = []
    for q in range(num_questions):
        family = families[(offset + q) % len(families)]
        target = ("yes" if next_yes else "no") if family == "appeared" else None
        about_shapes = family in _HAS_SHAPE_VARIANT and rng.random() < config.shape_question_ratio
        found = None
        for shapes_variant in ((True, False) if about_shapes else (False,)):
            for t in rng.permutation(times):
                qa = BUILDERS[family](spec, int(t), rng, config, shapes_variant, target)
                if qa is not None:
                    found = (int(t), *qa)
                    break
            if found is not None:
                break
        if found is None:
            continue
        if family == "appeared":
            next_yes = not next_yes
        t, question, answer = found
        questions.append(Question(f"{spec.id}_q{q:02d}", spec.id, t, family, question, answer))
    return questions


# --------------------------------------------------------------------------- captions


def describe_scene(scene: Scene) -> str:
    shapes = [f"a {s.color} {s.kind}" for s in scene.shapes]
    if not shapes:
        return f"{scene.background} background"
    listing = shapes[0] if len(shapes) == 1 else ", ".join(shapes[:-1]) + " and " + shapes[-1]
    return f"{scene.background} background with {listing}"


def caption(spec: StreamSpec, t: int) -> str:
    """Every scene seen in frames [0, t], in order."""
    return ", then ".join(describe_scene(scene) for scene, _ in spec.observed(t)) + "."


def caption_times(spec: StreamSpec, num_captions: int, rng: np.random.Generator) -> list[int]:
    """The whole stream first, then distinct random earlier cut-off times."""
    if num_captions <= 0:
        return []
    earlier = rng.permutation(spec.length - 1)[:num_captions - 1]
    return [spec.length - 1] + sorted(int(t) for t in earlier)


# --------------------------------------------------------------------------- dataset


def video_relpath(split: str, stream_id: str) -> str:
    return f"videos/{split}/{stream_id}.mp4"


def dataset_paths(output_dir: Union[str, Path]) -> dict[str, str]:
    root = Path(output_dir)
    paths = {"root": root, "videos": root / "videos", "pretrain": root / "pretrain.json",
             "finetune": root / "finetune.json", "corpus": root / "corpus.txt",
             "meta": root / "meta.json"}
    for split in SPLITS:
        paths[f"{split}_videos"] = root / "videos" / split
        paths[f"{split}_qa"] = root / f"{split}_qa.json"
        paths[f"{split}_streams"] = root / f"{split}_streams.json"
    return {k: str(v) for k, v in paths.items()}


def _write_stream_video(job: tuple[StreamSpec, str, Optional[str]]) -> None:
    spec, path, codec = job
    write_mp4(render_stream(spec), path, FPS, codec)


def _as_range(value: IntRange) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    lo, hi = value
    return int(lo), int(hi)


def _dump_json(obj, path: Union[str, Path]) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def qa_record(q: Question, duration: int, split: str) -> dict:
    """Evaluation format (test_qa.json)."""
    return {"video_id": q.video_id, "question": q.question, "id": q.id, "answer": q.answer,
            "answer_type": q.family, "duration": duration, "time": q.time,
            "video": video_relpath(split, q.video_id)}


def llava_record(record_id: str, video: str, t: int, prompt: str, reply: str, **extra) -> dict:
    """LLaVA training format; `time` = use frames [0, t] of `video`."""
    return {"id": record_id, "video": video, "time": t, **extra,
            "conversations": [{"from": "human", "value": f"{DEFAULT_IMAGE_TOKEN}\n{prompt}"},
                              {"from": "gpt", "value": reply}]}


def generate_dataset(output_dir: Union[str, Path], num_train_streams: int = 200,
                     num_test_streams: int = 40, stream_length: IntRange = (40, 80), seed: int = 0,
                     frame_size: int = 64, scene_duration: IntRange = (4, 16),
                     shapes_per_scene: IntRange = (1, 3), train_questions_per_stream: int = 10,
                     test_questions_per_stream: int = 5, captions_per_stream: int = 3,
                     shape_question_ratio: float = 0.3, min_question_time: int = 8,
                     start_gap: int = 10, longest_margin: int = 2, codec: Optional[str] = None,
                     workers: int = 1, overwrite: bool = False) -> dict[str, str]:
    """Write the whole dataset under `output_dir` and return its paths (see dataset_paths).

    Same arguments -> byte-identical JSON and identical videos. If `meta.json` shows a finished
    run with the same settings, nothing is redone unless `overwrite`.
    """
    config = SyntheticConfig(
        stream_length=_as_range(stream_length), scene_duration=_as_range(scene_duration),
        shapes_per_scene=_as_range(shapes_per_scene), frame_size=frame_size,
        shape_question_ratio=shape_question_ratio, min_question_time=min_question_time,
        start_gap=start_gap, longest_margin=longest_margin)
    codec = codec or default_codec()
    counts = {"train": num_train_streams, "test": num_test_streams}
    num_questions = {"train": train_questions_per_stream, "test": test_questions_per_stream}
    settings = {"seed": seed, "num_streams": counts, "questions_per_stream": num_questions,
                "captions_per_stream": captions_per_stream, "codec": codec, "fps": FPS,
                "config": asdict(config)}
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back from meta.json
    paths = dataset_paths(output_dir)
    if not overwrite and _finished(paths, settings):
        return paths

    specs = {split: [sample_stream(f"{split}_{i:04d}", _rng(seed, split, i, _SPEC), config)
                     for i in range(counts[split])] for split in SPLITS}

    for split in SPLITS:  # drop videos a previous, larger run left behind
        keep = {f"{s.id}.mp4" for s in specs[split]}
        folder = Path(paths[f"{split}_videos"])
        if folder.is_dir():
            for stale in folder.glob(f"{split}_*.mp4"):
                if stale.name not in keep:
                    stale.unlink()
    Path(paths["meta"]).unlink(missing_ok=True)  # unfinished until rewritten at the end
    jobs = [(spec, str(Path(paths["root"]) / video_relpath(split, spec.id)), codec)
            for split in SPLITS for spec in specs[split]]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_stream_video, jobs, chunksize=8))
    else:
        for job in jobs:
            _write_stream_video(job)

    corpus: list[str] = []
    qa: dict[str, list[dict]] = {}
    finetune: list[dict] = []
    for split in SPLITS:
        qa[split] = []
        for i, spec in enumerate(specs[split]):
            for q in make_questions(spec, num_questions[split], _rng(seed, split, i, _QUESTIONS), config):
                qa[split].append(qa_record(q, spec.length, split))
                corpus += [q.question, q.answer]
                if split == "train":
                    finetune.append(llava_record(q.id, video_relpath(split, spec.id), q.time,
                                                 q.question, q.answer, answer_type=q.family))
    pretrain = []
    for i, spec in enumerate(specs["train"]):
        for j, t in enumerate(caption_times(spec, captions_per_stream, _rng(seed, "train", i, _CAPTIONS))):
            text = caption(spec, t)
            pretrain.append(llava_record(f"{spec.id}_c{j}", video_relpath("train", spec.id), t, "", text))
            corpus.append(text)
    corpus.append(" ".join(list(COLORS) + list(SHAPES) + ["yes", "no"]))  # every answer word

    for split in SPLITS:
        _dump_json(qa[split], paths[f"{split}_qa"])
        _dump_json([s.to_dict() for s in specs[split]], paths[f"{split}_streams"])
    _dump_json(pretrain, paths["pretrain"])
    _dump_json(finetune, paths["finetune"])
    Path(paths["corpus"]).write_text("\n".join(corpus) + "\n")
    summary = {split: {"streams": counts[split], "frames": sum(s.length for s in specs[split]),
                       "questions": {f: sum(r["answer_type"] == f for r in qa[split]) for f in FAMILIES}}
               for split in SPLITS}
    summary["pretrain"], summary["finetune"] = len(pretrain), len(finetune)
    _dump_json({"settings": settings, "summary": summary}, paths["meta"])  # written last
    return paths


def _finished(paths: dict[str, str], settings: dict) -> bool:
    meta = Path(paths["meta"])
    if not meta.is_file():
        return False
    try:
        if json.loads(meta.read_text()).get("settings") != settings:
            return False
    except json.JSONDecodeError:
        return False
    files = [paths[k] for k in ("pretrain", "finetune", "corpus")]
    files += [paths[f"{s}_{k}"] for s in SPLITS for k in ("qa", "streams")]
    if not all(Path(f).is_file() for f in files):
        return False
    return all(len(list(Path(paths[f"{s}_videos"]).glob("*.mp4"))) == settings["num_streams"][s]
               for s in SPLITS)


def load_streams(path: Union[str, Path]) -> list[StreamSpec]:
    """Read back `<split>_streams.json`."""
    return [StreamSpec.from_dict(d) for d in json.loads(Path(path).read_text())]


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flash_vstream.demo.synthetic",
                                description="Generate the synthetic stream-memory dataset.")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--num-streams", "--num-train-streams", dest="num_train_streams", type=int,
                   default=200, help="training streams")
    p.add_argument("--num-test-streams", type=int, default=40, help="held-out streams")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-length", type=int, default=40, help="stream length, s (= frames)")
    p.add_argument("--max-length", type=int, default=80)
    p.add_argument("--min-scene", type=int, default=4, help="scene duration, s")
    p.add_argument("--max-scene", type=int, default=16)
    p.add_argument("--min-shapes", type=int, default=1, help="shapes per scene (at most 4)")
    p.add_argument("--max-shapes", type=int, default=3)
    p.add_argument("--frame-size", type=int, default=64, help="frame side in pixels (even)")
    p.add_argument("--train-questions-per-stream", type=int, default=10)
    p.add_argument("--test-questions-per-stream", type=int, default=5)
    p.add_argument("--captions-per-stream", type=int, default=3, help="stage-1 captions")
    p.add_argument("--shape-question-ratio", type=float, default=0.3)
    p.add_argument("--min-question-time", type=int, default=8)
    p.add_argument("--start-gap", type=int, default=10)
    p.add_argument("--longest-margin", type=int, default=2)
    p.add_argument("--codec", default=None, help="libx264 (default when available) or mpeg4")
    p.add_argument("--workers", type=int, default=1, help="processes encoding videos")
    p.add_argument("--overwrite", action="store_true", help="regenerate even if finished")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict[str, str]:
    args = build_parser().parse_args(argv)
    start = _time.perf_counter()
    paths = generate_dataset(
        args.output, num_train_streams=args.num_train_streams,
        num_test_streams=args.num_test_streams, stream_length=(args.min_length, args.max_length),
        seed=args.seed, frame_size=args.frame_size,
        scene_duration=(args.min_scene, args.max_scene),
        shapes_per_scene=(args.min_shapes, args.max_shapes),
        train_questions_per_stream=args.train_questions_per_stream,
        test_questions_per_stream=args.test_questions_per_stream,
        captions_per_stream=args.captions_per_stream,
        shape_question_ratio=args.shape_question_ratio, min_question_time=args.min_question_time,
        start_gap=args.start_gap, longest_margin=args.longest_margin, codec=args.codec,
        workers=args.workers, overwrite=args.overwrite)
    summary = json.loads(Path(paths["meta"]).read_text())["summary"]
    for split in SPLITS:
        s = summary[split]
        print(f"{split}: {s['streams']} streams, {s['frames']} frames, questions {s['questions']}")
    print(f"pretrain {summary['pretrain']} captions, finetune {summary['finetune']} QA; "
          f"wrote {paths['root']} in {_time.perf_counter() - start:.1f} s")
    return paths


if __name__ == "__main__":
    main()
