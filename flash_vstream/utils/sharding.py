"""The one sharding rule: contiguous, balanced chunks (sizes differ by at most one).

Used by inference (questions) and feature extraction (files); the chunks of one list cover every
item exactly once, in order, whatever the number of chunks.
"""


def check_shard(num_chunks, chunk_idx):
    """Raise ValueError unless `chunk_idx` names one of `num_chunks` (>= 1) chunks."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx {chunk_idx} is outside 0..{num_chunks - 1}")


def shard_bounds(n, num_chunks, chunk_idx):
    """[lo, hi) of `n` items for chunk `chunk_idx` of `num_chunks`."""
    check_shard(num_chunks, chunk_idx)
    return n * chunk_idx // num_chunks, n * (chunk_idx + 1) // num_chunks


def shard(items, num_chunks, chunk_idx):
    """Chunk `chunk_idx` of `num_chunks` of a list (see shard_bounds)."""
    lo, hi = shard_bounds(len(items), num_chunks, chunk_idx)
    return items[lo:hi]
