"""Checkpoints and final outputs that are whole or absent, whenever the process is killed.

A checkpoint is written into `<output_dir>/.incomplete/checkpoint-N`, fsynced, sealed with a
completion marker that lists its files and their sizes, and only then renamed to
`<output_dir>/checkpoint-N` (one rename). `--resume_from_checkpoint auto` resumes from the newest
`checkpoint-N` whose marker matches its files. Everything else is named in a warning, skipped and
removed: the staging folder of a killed save, a `checkpoint-*` folder without a marker (what a
kill during a save left before this: HF's Trainer writes straight into `checkpoint-N`, and every
restart then failed with "Can't find a valid checkpoint"), one whose files no longer match. A
marker-less folder that holds its trainer state (maybe whole, from before markers) is skipped but
kept.

The final outputs (the stage-1 `mm_projector.bin`, a full model, a LoRA adapter) are staged the
same way and moved into `output_dir` one rename per file, `config.json` last.
"""

import contextlib
import json
import logging
import os
import re
import shutil

import torch
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..utils.files import write_json

logger = logging.getLogger(__name__)

MARKER = "checkpoint_complete.json"  # written last into a staged checkpoint: {global_step, files: {path: bytes}}
STAGING = ".incomplete"  # under output_dir: staged checkpoints and outputs, retired checkpoints
NO_MARKER = "no completion marker"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointWriteCallback(TrainerCallback):
    """A `TrainerCallback` that `VStreamTrainer` also calls in the middle of writing a checkpoint.

    `on_checkpoint_writing(args, state, control, folder)` runs once the Trainer's own files
    (weights, optimizer, scheduler, RNG states, trainer state) are in the staging `folder`, before
    the stage-1 adapter and the completion marker are written and before the folder is renamed into
    place. It is the documented test hook: a test blocks here and kills the process, so the kill
    lands inside a save at a known point.
    """

    def on_checkpoint_writing(self, args, state, control, folder, **kwargs):
        pass


def barrier():
    """Wait for every process of the run. torch.distributed's own barrier: accelerate's
    `wait_for_everyone` skips it when accelerate does not drive the processes (CPU processes under
    torchrun without DDP), and a save must never seal before every rank has written its files."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def staging_root(run_dir):
    return os.path.join(run_dir, STAGING)


def checkpoint_folders(run_dir):
    """[(step, path)] of the `checkpoint-N` folders of `run_dir`, oldest step first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(run_dir, name)):
            found.append((int(match.group(1)), os.path.join(run_dir, name)))
    return sorted(found)


def _file_sizes(folder):
    """{path relative to folder: bytes} of every file under `folder` but the marker."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != MARKER:
                sizes[rel] = os.path.getsize(path)
    return sizes


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder):
    """Force every file and folder under `folder` to disk (a kill alone loses nothing written;
    a power cut loses what only sits in the page cache)."""
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def seal(folder, step):
    """Fsync a staged checkpoint, then write its completion marker (the last file written)."""
    _fsync_tree(folder)
    write_json(os.path.join(folder, MARKER), {"global_step": step, "files": _file_sizes(folder)})


def why_incomplete(folder):
    """None for a sealed checkpoint whose files all have the sizes its marker lists, else why not."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return NO_MARKER
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable completion marker ({error})"
    for rel, size in files.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != size:
            return f"{rel} has {os.path.getsize(path)} bytes, the marker says {size}"
    return None


def _remove(folder):
    """Take `folder` out of view in one rename (into the staging root), then delete it."""
    root = staging_root(os.path.dirname(os.path.abspath(folder)))
    os.makedirs(root, exist_ok=True)
    aside = os.path.join(root, os.path.basename(folder) + ".removed")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _drop_staging_root_if_empty(run_dir):
    with contextlib.suppress(OSError):
        os.rmdir(staging_root(run_dir))


def publish(staged, final):
    """Rename a sealed staged checkpoint to its final name; a folder already there is removed first."""
    if os.path.exists(final):
        _remove(final)
    os.replace(staged, final)
    _fsync_dir(os.path.dirname(os.path.abspath(final)))
    _drop_staging_root_if_empty(os.path.dirname(os.path.abspath(final)))


def rotate(run_dir, save_total_limit, keep=None):
    """Remove the oldest checkpoints beyond `save_total_limit`; the newest and `keep` (the best) stay."""
    if not save_total_limit or save_total_limit <= 0:
        return
    found = [path for _, path in checkpoint_folders(run_dir)]
    protected = {found[-1]} | ({os.path.abspath(keep)} if keep else set())
    excess = len(found) - max(save_total_limit, len(protected))
    for path in found:
        if excess <= 0:
            break
        if os.path.abspath(path) not in protected:
            _remove(path)
            excess -= 1
    _drop_staging_root_if_empty(run_dir)


def resolve_auto(run_dir, clean):
    """The newest complete `checkpoint-N` of `run_dir` for `--resume_from_checkpoint auto`, or None.

    Incomplete `checkpoint-*` folders are named in a warning and skipped; with `clean` (the main
    process: the others only read) they are removed, and so is the staging folder of killed saves.
    A folder without a marker but with its trainer state may be a whole checkpoint written before
    markers existed: it is skipped and left in place (resume from it by its path, or delete it).
    """
    newest = None
    for _, path in reversed(checkpoint_folders(run_dir)):
        why = why_incomplete(path)
        if why is None:
            newest = newest or path
            continue
        if why == NO_MARKER and os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            logger.warning("%s has no completion marker but a trainer state (written before markers?): skipped, "
                           "left in place; resume from it by its path, or delete it", path)
            continue
        logger.warning("%s is an incomplete checkpoint (%s): skipped%s", path, why, ", removed" if clean else "")
        if clean:
            _remove(path)
    root = staging_root(run_dir)
    if clean and os.path.isdir(root):
        left = sorted(os.listdir(root))
        if left:
            logger.warning("%s: removing what killed saves left (%s)", root, ", ".join(left))
        shutil.rmtree(root)
    return newest


@contextlib.contextmanager
def staged_outputs(output_dir, is_main):
    """Yield a staging folder for a stage's final outputs; when the block ends, every file in it is
    moved into `output_dir` with one rename each, `config.json` last (a folder whose config is
    there has its weights). All processes enter it (a ZeRO-3 save writes on each rank)."""
    staged = os.path.join(staging_root(output_dir), "outputs")
    if is_main:
        shutil.rmtree(staged, ignore_errors=True)  # what a killed save of the outputs left
        os.makedirs(staged)
    barrier()
    yield staged
    barrier()
    if not is_main:
        return
    _fsync_tree(staged)
    for rel in sorted(_file_sizes(staged), key=lambda rel: os.path.basename(rel) == "config.json"):
        target = os.path.join(output_dir, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(staged, rel), target)
    _fsync_dir(output_dir)
    shutil.rmtree(staged, ignore_errors=True)
    _drop_staging_root_if_empty(output_dir)
