"""Padding-free packing (`--packing True`): a batch's samples laid back to back in rows.

Each sample arrives with its `<image>` placeholder already expanded to its memory size (the
dataset does it), so the length packed is the length the LLM sees. A packed batch holds:

- `input_ids`, `labels` (R, W): rows of at most `max_length` tokens, right-padded to the
  longest row; the label of each sample's first token is -100, so the shifted loss never asks a
  sample's last token to predict the next sample's first one;
- `position_ids` (R, W): 0, 1, ... restarting at every sample (RoPE as if each were alone); the
  row padding is a sample of its own;
- `cu_seq_lens_q` / `cu_seq_lens_k` (S+1,) int32 and `max_length_q` / `max_length_k`: the same
  samples as offsets into the R*W flattened tokens (the names transformers' flash-attention path
  and `DataCollatorWithFlattening` use);
- no `attention_mask`: transformers reads the packed layout from `position_ids`
  (`model/language_model/packed.py` lists what each attention implementation does with it), and
  only without a KV cache: the model runs with `use_cache=False`, as `train.py` sets it;
- the media lists (`features` / `images` / `frozen_memory`) in packed order, i.e. the order of
  the placeholders row by row, which is the order the model scatters the memory in.

The samples per step stay `per_device_train_batch_size` (the paper's global batches hold), and
the loss is the padded batch's loss: the same supervised tokens, the same mean.
"""

import importlib.util
from dataclasses import dataclass

import torch

from ..constants import IGNORE_INDEX
from ..model.language_model.packed import TORCH_VARLEN
from .dataset import SampleError

MEDIA_KEYS = ("features", "images", "frozen_memory")


def pack_rows(lengths, max_length=None):
    """Sample lengths -> rows (lists of sample indices), each of at most `max_length` tokens.

    First-fit decreasing: longest first, each into the first row with room. `max_length=None`
    puts every sample in one row.
    """
    if max_length is None:
        return [list(range(len(lengths)))]
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > max_length:
            raise ValueError(f"a sample of {lengths[i]} tokens does not fit a row of {max_length}")
        row = next((r for r in range(len(rows)) if room[r] >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(max_length)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


@dataclass
class DataCollatorForPackedDataset:
    """Packs the samples of a batch into rows of at most `max_length` tokens (None: one row)."""

    pad_token_id: int
    max_length: int = None

    def __call__(self, instances):
        instances = [x for x in instances if x is not None]
        if not instances:
            raise SampleError("every sample of this batch was skipped (see the warnings above)")
        lengths = [len(x["input_ids"]) for x in instances]
        rows = pack_rows(lengths, self.max_length)
        width = max(sum(lengths[i] for i in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        segments = []  # lengths of the samples (and row paddings) along the flattened (R*W) tokens
        order = []  # sample indices in packed order
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = lengths[i]
                ids[r, at:at + n] = instances[i]["input_ids"]
                labels[r, at:at + n] = instances[i]["labels"]
                labels[r, at] = IGNORE_INDEX  # never a target of the previous sample's last token
                positions[r, at:at + n] = torch.arange(n)
                segments.append(n)
                at += n
            if at < width:  # the row padding: a sample of its own, supervising nothing
                positions[r, at:] = torch.arange(width - at)
                segments.append(width - at)
            order.extend(row)
        cu_seq_lens = torch.zeros(len(segments) + 1, dtype=torch.int32)
        cu_seq_lens[1:] = torch.tensor(segments).cumsum(0)
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions,
                 "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
                 "max_length_q": max(segments), "max_length_k": max(segments)}
        present = [key for key in MEDIA_KEYS if any(key in x for x in instances)]
        if len(present) > 1:
            raise SampleError(f"a batch mixes {' and '.join(present)}; use one --use_features setting")
        for key in present:
            batch[key] = [instances[i][key] for i in order if key in instances[i]]
        return batch


def check_packing(packing, attn_implementation):
    """`torch_varlen` runs packed rows only; refuse it without `--packing True`."""
    if attn_implementation == TORCH_VARLEN and not packing:
        raise ValueError(f"--attn_implementation {TORCH_VARLEN} needs --packing True (it runs packed rows only)")


def default_attn_implementation():
    """The attention `train_mem.py` picks when none is asked for: flash-attn 2 when installed (its varlen
    kernel serves packed rows too), else None (keep the `sdpa` default, which runs packed rows under a
    block-diagonal mask). `torch_varlen` stays opt-in (`--attn_implementation torch_varlen`): it matched the
    padded batch on a GPU (`pytest -m gpu tests/train/test_packing.py`), but its speed has not been measured."""
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def packing_requested(argv):
    """Whether command-line flags ask for `--packing` (`--packing`, `--packing True`), as HfArgumentParser reads them."""
    if "--packing" not in argv:
        return False
    at = argv.index("--packing") + 1
    return at == len(argv) or argv[at].startswith("--") or argv[at].lower() in ("true", "yes", "1")
