"""Training data: LLaVA-format records -> token ids, labels and the media the memory is built from.

Records: `{id, image | video, conversations: [{from: human|gpt, value}], time?}`; text-only
records have neither media key. `time` (seconds) cuts a video at a question time (frames with
timestamp <= time). Media are read raw (decoded at `video_fps`, CLIP-preprocessed) or as
pre-extracted features (`.safetensors`), chosen by the explicit `use_features` option.

`memory_build="dataloader"` (feature mode) builds the weight-free part of each sample's STAR memory
here, in the data loader's workers (`memory.frozen_memory`), so that the training step runs only the
Semantic Attention; `"forward"` hands the features to the model, which builds the whole memory per
sample in its forward pass (the baseline). Raw media are always encoded and built in forward.
"""

import json
import logging
import math
import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from ..conversation import conversation_from_record
from ..mm_utils import expand_image_tokens, process_images, tokenize_conversation, truncate_keeping_memory
from ..model.memory import frozen_memory, memory_num_tokens
from ..features import FeatureLoadError, feature_file_for, load_features, valid_feature_file
from ..video_io import VideoReadError, load_image, read_frames

logger = logging.getLogger(__name__)
LONG_CLIP_FRAMES = 10**6  # a clip long enough to fill every memory (its memory size is the largest)
MEMORY_BUILDS = ("forward", "dataloader")


class SampleError(RuntimeError):
    """A training record that cannot be used; the message names the record and the file."""


def load_records(data_path):
    try:
        with open(data_path) as f:
            records = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{data_path}: cannot read training data: {error}") from error
    if not isinstance(records, list):
        raise ValueError(f"{data_path}: expected a JSON list of records, got {type(records).__name__}")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise ValueError(f"{data_path}: record {i} has no 'conversations' list")
    return records


class LazySupervisedDataset(Dataset):
    """Reads media lazily; tokenises with the stage's template and supervises assistant replies."""

    def __init__(self, data_path, tokenizer, model_config, template, image_folder=None, video_folder=None,
                 use_features=False, image_processor=None, image_aspect_ratio="pad", video_fps=1.0,
                 model_max_length=2048, skip_bad_samples=False, memory_build="forward", memory_dtype=None):
        self.data_path = data_path
        self.tokenizer = tokenizer
        self.config = model_config
        self.template = template
        self.image_folder = image_folder
        self.video_folder = video_folder
        self.use_features = use_features
        self.image_processor = image_processor
        self.image_aspect_ratio = image_aspect_ratio
        self.video_fps = video_fps
        self.model_max_length = model_max_length
        self.skip_bad_samples = skip_bad_samples
        if memory_build not in MEMORY_BUILDS:
            raise ValueError(f"memory_build must be one of {MEMORY_BUILDS}, got {memory_build!r}")
        self.memory_build = memory_build
        self.memory_dtype = memory_dtype  # the model's projector dtype: features are cast to it first, as in forward
        self.skipped = []
        records = load_records(data_path)
        if not use_features and image_processor is None and any(self._media(r) for r in records):
            raise ValueError("raw media need the vision tower's image processor (or pass --use_features)")
        if skip_bad_samples:
            kept = []
            for record in records:
                problem = self._check_media(record)
                if problem:
                    self.skipped.append(problem)
                else:
                    kept.append(record)
            if self.skipped:
                logger.warning("%s: skipped %d of %d records with missing or invalid media, e.g. %s",
                               data_path, len(self.skipped), len(records), self.skipped[:3])
            records = kept
        self.records = records

    def __len__(self):
        return len(self.records)

    # --- media -------------------------------------------------------------------------------
    def _media(self, record):
        if "video" in record:
            return "video", self.video_folder, record["video"]
        if "image" in record:
            return "image", self.image_folder, record["image"]
        return None

    def _media_path(self, kind, folder, relative):
        if folder is None:
            raise SampleError(f"record needs --{kind}_folder")
        return feature_file_for(folder, relative) if self.use_features else os.path.join(folder, relative)

    def _check_media(self, record):
        media = self._media(record)
        if media is None:
            return None
        try:
            path = self._media_path(*media)
        except SampleError as error:
            return f"{record.get('id')}: {error}"
        if not os.path.isfile(path):
            return f"{record.get('id')}: missing {path}"
        if self.use_features and not valid_feature_file(path, hidden_size=self.config.mm_hidden_size):
            return f"{record.get('id')}: invalid feature file {path}"
        return None

    def _load_media(self, record):
        """(kind, tensor) with tensor (T, 256, D) features or (T, 3, H, W) pixels."""
        kind, folder, relative = self._media(record)
        path = self._media_path(kind, folder, relative)
        end = record.get("time")
        if self.use_features:
            feature = load_features(path, hidden_size=self.config.mm_hidden_size)  # (T, 256, D)
            if end is not None and kind == "video":
                feature = feature[: int(math.floor(end * self.video_fps + 1e-6)) + 1]  # frames at t <= time
            return "features", feature
        if kind == "image":
            frames = [load_image(path)]
        else:
            frames, _ = read_frames(path, fps=self.video_fps, end=end)
        return "images", process_images(frames, self.image_processor, self.image_aspect_ratio)  # (T, 3, H, W)

    # --- one sample --------------------------------------------------------------------------
    def __getitem__(self, index):
        record = self.records[index]
        name = f"{self.data_path} record {index} (id {record.get('id')!r})"
        try:
            return self._build(record, name)
        except (SampleError, VideoReadError, FeatureLoadError, OSError, ValueError) as error:
            if self.skip_bad_samples:
                logger.warning("skipping %s: %s", name, error)
                return None
            raise SampleError(f"{name}: {error}") from error

    def _build(self, record, name):
        turns = [dict(t) for t in record["conversations"]]
        media = self._media(record)
        has_placeholder = any(DEFAULT_IMAGE_TOKEN in t.get("value", "") for t in turns)
        if media is not None and not has_placeholder and turns:
            turns[0]["value"] = DEFAULT_IMAGE_TOKEN + "\n" + turns[0]["value"]
        if media is None and has_placeholder:
            raise SampleError("text mentions <image> but the record has no image or video")
        conv = conversation_from_record(turns, self.template)
        input_ids, labels = tokenize_conversation(conv, self.tokenizer)
        item = {}
        if media is not None:
            key, tensor = self._load_media(record)
            input_ids, labels = expand_image_tokens(input_ids, memory_num_tokens(len(tensor), self.config), labels)
            item.update(self._media_item(key, tensor))
        input_ids, labels = truncate_keeping_memory(input_ids, labels, self.model_max_length, source=name)
        item.update(input_ids=input_ids, labels=labels)
        return item

    def _media_item(self, key, tensor):
        """{"features": (T, 256, D)} / {"images": (T, 3, H, W)}, or {"frozen_memory": dict} (memory_build dataloader)."""
        if key != "features" or self.memory_build != "dataloader":
            return {key: tensor}
        if self.memory_dtype is not None:
            tensor = tensor.to(self.memory_dtype)
        return {"frozen_memory": frozen_memory(tensor, self.config, seed=0)}  # the seed build_memory uses

    @property
    def modality_lengths(self):
        """Approximate lengths for grouping, memory tokens included; negative for text-only records.

        Text counts its words. An image adds its memory size (one frame: 81 tokens in paper mode); a
        video the memory of its frames up to `time` when the record cuts it, else of a long clip
        (681 at the released sizes, exact from 26 frames on): no media file is opened here.
        """
        lengths = []
        for record in self.records:
            words = sum(len(t.get("value", "").split()) for t in record["conversations"])
            media = self._media(record)
            lengths.append(words + self._memory_length(record, media[0]) if media else -words)
        return lengths

    def _memory_length(self, record, kind):
        if kind == "image":
            frames = 1
        elif record.get("time") is not None:
            frames = int(math.floor(record["time"] * self.video_fps + 1e-6)) + 1  # frames at t <= time, at most
        else:
            frames = LONG_CLIP_FRAMES
        return memory_num_tokens(frames, self.config)


@dataclass
class DataCollatorForSupervisedDataset:
    """Right-pads ids/labels; media go in a list, one entry per row holding a placeholder."""

    pad_token_id: int

    def __call__(self, instances):
        instances = [x for x in instances if x is not None]
        if not instances:
            raise SampleError("every sample of this batch was skipped (see the warnings above)")
        width = max(len(x["input_ids"]) for x in instances)
        ids = torch.full((len(instances), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(instances), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(instances), width), dtype=torch.long)
        for i, x in enumerate(instances):
            n = len(x["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = x["input_ids"], x["labels"], 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        for key in ("features", "images", "frozen_memory"):
            media = [x[key] for x in instances if key in x]
            if media:
                batch[key] = media
        if "features" in batch and "images" in batch:
            raise SampleError("a batch mixes raw frames and features; use one --use_features setting")
        return batch
