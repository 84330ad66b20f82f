"""Tokenising prompts with the `<image>` placeholder, stopping criteria, and frame preprocessing."""

import os

import numpy as np
import torch
from PIL import Image
from transformers import StoppingCriteria

from .constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX


def _tokenize_chunks(text, tokenizer):
    """Split `text` on `<image>`; tokenise each piece with offsets. Returns [(ids, offsets, start)]."""
    chunks, start = [], 0
    for piece in text.split(DEFAULT_IMAGE_TOKEN):
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        chunks.append((enc["input_ids"], [(a + start, b + start) for a, b in enc["offset_mapping"]]))
        start += len(piece) + len(DEFAULT_IMAGE_TOKEN)
    return chunks


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX, return_tensors=None):
    """Token ids of `prompt` with BOS first and `image_token_index` (-200) where `<image>` stood."""
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for i, (chunk_ids, _) in enumerate(_tokenize_chunks(prompt, tokenizer)):
        if i:
            ids.append(image_token_index)
        ids.extend(chunk_ids)
    if return_tensors == "pt":
        return torch.tensor(ids, dtype=torch.long)
    if return_tensors is not None:
        raise ValueError(f"unsupported return_tensors {return_tensors!r}")
    return ids


def tokenize_conversation(conv, tokenizer):
    """(input_ids, labels) of a filled conversation; labels keep only the assistant replies.

    Labels are set from character spans of the rendered prompt, so the mask cannot drift from
    the tokens (the published code re-tokenised parts and corrected lengths by hand).
    """
    segments = conv.segments()
    text = "".join(t for t, _ in segments)
    spans, pos = [], 0
    for piece, is_target in segments:
        if is_target:
            spans.append((pos, pos + len(piece)))
        pos += len(piece)
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels = [IGNORE_INDEX] * len(ids)
    for i, (chunk_ids, offsets) in enumerate(_tokenize_chunks(text, tokenizer)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
        for tok, (_, b) in zip(chunk_ids, offsets):
            ids.append(tok)
            # a token belongs to the span its last character falls in ("▁red" starts at the space)
            target = any(s < b <= e for s, e in spans)
            labels.append(tok if target else IGNORE_INDEX)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def expand_image_tokens(input_ids, num_tokens, labels=None):
    """Repeat the single IMAGE_TOKEN_INDEX of a 1-D id sequence `num_tokens` times.

    The model scatters exactly that many memory tokens into those positions. A sequence without
    a placeholder (text-only) is returned unchanged.
    """
    where = (input_ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
    if len(where) == 0:
        return input_ids if labels is None else (input_ids, labels)
    if len(where) != 1:
        raise ValueError(f"expected one {DEFAULT_IMAGE_TOKEN} placeholder, found {len(where)}")
    at = int(where[0])
    fill = input_ids.new_full((num_tokens,), IMAGE_TOKEN_INDEX)
    out = torch.cat([input_ids[:at], fill, input_ids[at + 1:]])
    if labels is None:
        return out
    ignore = labels.new_full((num_tokens,), IGNORE_INDEX)
    return out, torch.cat([labels[:at], ignore, labels[at + 1:]])


def truncate_keeping_memory(input_ids, labels, max_length, source="sample"):
    """Cut a sequence to `max_length` from the right; refuse to cut into the memory tokens."""
    if len(input_ids) <= max_length:
        return input_ids, labels
    image_positions = (input_ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
    if len(image_positions) and int(image_positions[-1]) >= max_length:
        raise ValueError(
            f"{source}: {len(input_ids)} tokens exceed max length {max_length} and truncation would cut "
            f"the {len(image_positions)} memory tokens; raise --model_max_length or shorten the text")
    return input_ids[:max_length], labels[:max_length]


def expand2square(image, background_color):
    """Pad a PIL image to a square, centred, with `background_color` (the CLIP mean colour)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background_color)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def _to_pil(frame):
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    array = np.asarray(frame)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 frame, got shape {array.shape} dtype {array.dtype}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(array[..., :3])


def process_images(frames, image_processor, image_aspect_ratio="pad"):
    """Frames (PIL images or uint8 HxWx3 arrays) -> pixel values (T, 3, S, S) for CLIP.

    `pad` pads each frame to a square with the processor's mean colour before the CLIP resize
    and centre crop; `square` hands the frame to the processor as it is.
    """
    images = [_to_pil(f) for f in frames]
    if image_aspect_ratio == "pad":
        mean = tuple(int(round(x * 255)) for x in image_processor.image_mean)
        images = [expand2square(img, mean) for img in images]
    elif image_aspect_ratio != "square":
        raise ValueError(f"image_aspect_ratio must be 'pad' or 'square', got {image_aspect_ratio!r}")
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


def get_model_name_from_path(model_path):
    parts = os.path.normpath(model_path).split(os.sep)
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop when every sequence ends with one of `keywords` (text or token ids)."""

    def __init__(self, keywords, tokenizer, input_ids):
        self.keywords = keywords
        self.tokenizer = tokenizer
        self.start_len = input_ids.shape[1]
        self.keyword_ids = []
        for keyword in keywords:
            ids = tokenizer(keyword, add_special_tokens=False).input_ids
            if ids:
                self.keyword_ids.append(torch.tensor(ids))

    def _done(self, row):
        for ids in self.keyword_ids:
            if len(row) >= len(ids) and torch.equal(row[-len(ids):].cpu(), ids):
                return True
        tail = self.tokenizer.decode(row[-8:], skip_special_tokens=False)
        return any(k in tail for k in self.keywords)

    def __call__(self, output_ids, scores, **kwargs):
        generated = output_ids[:, self.start_len:]
        done = [self._done(row) for row in generated]
        return torch.tensor(done, dtype=torch.bool, device=output_ids.device)
