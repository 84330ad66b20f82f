"""The feature-file format: what the extractor writes and training, eval and the CLI read.

A feature file is safetensors with one tensor `feature` ([T, 256, D] for a video, [256, D] for an
image) and string header metadata: `fps` (samples per second; 0 for an image), `timestamps` (a
JSON list of T seconds from the stream start), `source` (the media file it came from), and what
the extractor adds (`extractor_version`, `vision_tower`, `select_layer`, ...). Files are written
under a temporary name and renamed, so a file under the final name is always complete.
"""

import json
import math
import os

import torch

from flash_vstream.utils.files import atomic_path

FEATURE_EXTENSION = ".safetensors"


class FeatureLoadError(RuntimeError):
    """A feature file is missing, truncated or not the expected shape/dtype; names the file."""


def feature_file_for(folder, relative):
    """Where the features of media file `relative` live: `folder/<relative, only its extension replaced by
    .safetensors>` (the published code used str.replace, which also rewrote folder names containing the
    extension). The extractor writes there and training reads from there."""
    return os.path.join(folder, os.path.splitext(relative)[0] + FEATURE_EXTENSION)


def frame_times(meta, num_frames, default_fps):
    """The T timestamps (seconds) of a file's frames: its header's, else k / fps (the header's fps, else
    `default_fps`) for files written without them."""
    if meta.get("timestamps"):
        return list(meta["timestamps"])
    fps = meta.get("fps") or default_fps
    return [k / fps for k in range(num_frames)]


# ----------------------------------------------------------------------------- writing and reading

def _metadata_strings(metadata):
    out = {}
    for key, value in (metadata or {}).items():
        if key == "timestamps" or isinstance(value, (list, tuple, dict)):
            value = json.dumps([float(x) for x in value] if key == "timestamps" else value)
        out[str(key)] = value if isinstance(value, str) else str(value)
    return out


def save_features(path, feature, metadata=None):
    """Write `feature` (a tensor) to `path` as safetensors with string `metadata`, atomically
    (a temporary file in the same folder, then one rename): a file under the final name is complete."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"feature": feature.detach().cpu().contiguous()}, tmp, metadata=_metadata_strings(metadata))


def _parse_metadata(path, raw):
    meta = dict(raw or {})
    try:
        if "timestamps" in meta:
            meta["timestamps"] = [float(x) for x in json.loads(meta["timestamps"])]
            if not all(math.isfinite(x) for x in meta["timestamps"]):
                raise ValueError("non-finite timestamp")
        if "fps" in meta:
            meta["fps"] = float(meta["fps"])
    except (ValueError, TypeError) as e:
        raise FeatureLoadError(f"{path}: bad metadata in the header: {e}") from e
    return meta


def _open_checked(path, kind, hidden_size, num_patches):
    """Open a feature file and check its header; returns (safe_open handle, shape, metadata)."""
    from safetensors import safe_open

    if kind not in (None, "video", "image"):
        raise ValueError(f"kind must be 'video', 'image' or None, got {kind!r}")
    if not os.path.exists(path):
        raise FeatureLoadError(f"{path}: feature file not found")
    try:
        handle = safe_open(path, framework="pt")
    except Exception as e:  # SafetensorError: truncated, empty, not a safetensors file
        raise FeatureLoadError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    try:
        if "feature" not in handle.keys():
            raise FeatureLoadError(f"{path}: no tensor 'feature' (found {sorted(handle.keys())})")
        sliced = handle.get_slice("feature")
        shape, dtype = list(sliced.get_shape()), sliced.get_dtype()
        if dtype not in ("F16", "BF16", "F32", "F64"):
            raise FeatureLoadError(f"{path}: 'feature' has dtype {dtype}, expected a floating type")
        if kind == "video":
            expected = "[T, P, D]"
            ok = len(shape) == 3
        elif kind == "image":
            expected = "[P, D] (or [1, P, D])"
            ok = len(shape) == 2 or (len(shape) == 3 and shape[0] == 1)
        else:
            expected = "[T, P, D] or [P, D]"
            ok = len(shape) in (2, 3)
        if not ok:
            raise FeatureLoadError(f"{path}: 'feature' has shape {shape}, expected {expected}")
        if len(shape) == 2:
            shape = [1] + shape
        if shape[0] == 0:
            raise FeatureLoadError(f"{path}: 'feature' has no frames (shape {shape})")
        if num_patches is not None and shape[1] != num_patches:
            raise FeatureLoadError(f"{path}: 'feature' has {shape[1]} patches per frame, expected {num_patches}")
        if hidden_size is not None and shape[2] != hidden_size:
            raise FeatureLoadError(f"{path}: 'feature' has hidden size {shape[2]}, expected {hidden_size}")
        meta = _parse_metadata(path, handle.metadata())
        if "timestamps" in meta and len(meta["timestamps"]) != shape[0]:
            raise FeatureLoadError(f"{path}: {len(meta['timestamps'])} timestamps in the header for "
                                   f"{shape[0]} frames")
        return handle, shape, meta
    except BaseException:
        del handle
        raise


def load_features_with_meta(path, kind=None, hidden_size=None, num_patches=256, check_finite=True):
    """(feature [T, P, D] float tensor, metadata dict) from a feature file.

    An image file's [P, D] comes back as [1, P, D]. `metadata` has `fps` as float and
    `timestamps` as a list of floats; other keys stay strings. Anything wrong -> FeatureLoadError
    naming the file.
    """
    from safetensors.torch import load as load_bytes

    handle, shape, meta = _open_checked(path, kind, hidden_size, num_patches)
    del handle
    try:
        # read into memory rather than keep safetensors' memory map: a tensor backed by a file
        # that is later truncated in place kills the process with SIGBUS when touched
        with open(path, "rb") as f:
            feature = load_bytes(f.read())["feature"]
        feature = feature.reshape(shape)  # (T, P, D)
    except Exception as e:
        raise FeatureLoadError(f"{path}: cannot read 'feature' (changed while reading?): {e}") from e
    if check_finite and not bool(torch.isfinite(feature).all()):
        raise FeatureLoadError(f"{path}: 'feature' holds NaN or infinite values")
    return feature, meta


def load_features(path, kind=None, hidden_size=None, num_patches=256, check_finite=True):
    """Feature tensor [T, P, D] of a video (or [1, P, D] of an image) file; see load_features_with_meta."""
    return load_features_with_meta(path, kind, hidden_size, num_patches, check_finite)[0]


def valid_feature_file(path, kind=None, hidden_size=None, num_patches=256, fps=None):
    """True when `path` is a complete feature file of the expected shape (and `fps`, when given).

    Reads the header only; safetensors checks that the body covers every tensor, so a truncated
    file is invalid. Used to skip finished outputs when an extraction resumes.
    """
    try:
        handle, _, meta = _open_checked(path, kind, hidden_size, num_patches)
        del handle
    except FeatureLoadError:
        return False
    if fps is not None and kind != "image" and meta.get("fps") is not None and abs(meta["fps"] - fps) > 1e-6:
        return False
    return True
