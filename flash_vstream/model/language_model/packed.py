"""Packed (padding-free) rows in the model: per-sample segments and variable-length attention.

A packed row holds several samples back to back, each with position ids restarting at 0 and no
attention mask (`flash_vstream.train.packing` builds such batches). transformers 5.x reads that
layout itself, so each attention implementation keeps the samples apart without a patch:

- `sdpa` / `eager`: `masking_utils.create_causal_mask` finds the restarts in `position_ids` and
  builds a block-diagonal causal mask (what the CPU tests run);
- `flex_attention`: the same rule gives a document `BlockMask`;
- `flash_attention_2`: flash-attn's varlen kernel over the `cu_seq_lens_q/k` the batch carries;
- `torch_varlen` (registered here): PyTorch's own varlen kernel,
  `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 inside ATen, CUDA, fp16/bf16), over
  the same `cu_seq_lens`: the packed path on a GPU without flash-attn.
"""

import inspect

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

TORCH_VARLEN = "torch_varlen"


def segment_starts(position_ids):
    """(B, L) position ids -> (B, L) bool, True where a sample starts.

    The rule transformers' `find_packed_sequence_indices` uses: a sample starts wherever the
    position does not follow the previous one by exactly 1 (and at every row start).
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)  # (B, L)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    return starts


def per_sample_counts(mask, position_ids=None):
    """How many True each sample of `mask` (B, L) holds, in row-major sample order.

    Without `position_ids` every row is one sample (padded batches); with them, a row is split
    where the positions restart (packed batches). Returns a list of ints, one per sample.
    """
    if position_ids is None:
        return mask.sum(dim=1).tolist()
    segment = segment_starts(position_ids.expand_as(mask)).flatten().cumsum(0) - 1  # (B*L,) sample index
    counts = torch.zeros(int(segment[-1]) + 1, dtype=torch.long, device=mask.device)
    return counts.index_add_(0, segment, mask.flatten().long()).tolist()


def _varlen_kernel():
    """`varlen_attn` and its parameter names, or (None, ()) before torch 2.9.

    Its signature changed: torch 2.9-2.10 take `is_causal=True` and no `scale`; later releases
    take `scale=` and `window_size=(-1, 0)` for causal attention.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, ()
    return varlen_attn, tuple(inspect.signature(varlen_attn).parameters)


def _causal_kwargs(params, scaling, head_dim):
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kwargs["scale"] = scaling
    elif scaling is not None and abs(scaling - head_dim**-0.5) > 1e-12:
        raise ValueError(f"this torch's varlen_attn has no scale argument; the layer needs {scaling}")
    return kwargs


def torch_varlen_available():
    return _varlen_kernel()[0] is not None and torch.cuda.is_available()


def torch_varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                   cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                                   **kwargs):
    """An `AttentionInterface` function: causal attention inside each packed sample.

    query (B, H, L, Dh), key/value (B, H_kv, L, Dh) -> (B, L, H, Dh), None. The rows are flattened
    to (B*L) tokens and `cu_seq_lens_q/k` (int32, (S+1,)) cut them into the S samples (the row
    padding is a sample of its own). Without them every row is one sample (an unpadded batch).
    A padding mask, a KV cache or dropout have no meaning here: they raise.
    """
    varlen_attn, params = _varlen_kernel()
    if varlen_attn is None:
        raise RuntimeError(f"attn_implementation={TORCH_VARLEN!r} needs torch.nn.attention.varlen (torch >= 2.9)")
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        raise ValueError(f"attn_implementation={TORCH_VARLEN!r} runs packed training rows only (no padding mask, "
                         "no KV cache); train with --packing True, or use sdpa / flash_attention_2")
    if dropout:
        raise ValueError(f"attn_implementation={TORCH_VARLEN!r} has no attention dropout")
    if query.dtype not in (torch.float16, torch.bfloat16) or not query.is_cuda:
        raise ValueError(f"attn_implementation={TORCH_VARLEN!r} runs fp16/bf16 on CUDA (got {query.dtype} on "
                         f"{query.device}); use sdpa elsewhere")
    batch, heads, length, head_dim = query.shape
    if cu_seq_lens_q is None:  # unpadded rows, one sample each
        cu_seq_lens_q = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=query.device)
        cu_seq_lens_k, max_length_q, max_length_k = cu_seq_lens_q, length, length
    kwargs = _causal_kwargs(params, scaling, head_dim)
    groups = heads // key.shape[1]
    if groups > 1 and "enable_gqa" in params:  # grouped-query attention in the kernel
        kwargs["enable_gqa"] = True
    elif groups > 1:  # one key/value head per group of query heads, repeated as transformers' repeat_kv does
        key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))  # (B, H, L, Dh)
    q = query.transpose(1, 2).reshape(batch * length, heads, head_dim)  # (B*L, H, Dh)
    k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], head_dim) for x in (key, value))  # (B*L, H_kv, Dh)
    cu_q, cu_k = (x.to(device=query.device, dtype=torch.int32) for x in (cu_seq_lens_q, cu_seq_lens_k))
    out = varlen_attn(q, k, v, cu_q, cu_k, int(max_length_q), int(max_length_k), **kwargs)  # (B*L, H, Dh)
    return out.view(batch, length, heads, head_dim), None


# transformers' documented extension point for attention kernels: `attn_implementation="torch_varlen"`
# then selects this function. Its mask function is flash-attn's (the 2D padding mask or None), so no
# (L, L) mask is built for a packed batch.
AttentionInterface.register(TORCH_VARLEN, torch_varlen_attention_forward)
AttentionMaskInterface.register(TORCH_VARLEN, flash_attention_mask)
