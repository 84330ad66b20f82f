"""The one percentile rule (linear interpolation between closest ranks, numpy's default) and a
summary of latency-like samples."""

import math


def percentile(values, q):
    """The q-th percentile (q in 0..100) of `values`, interpolated linearly between the two
    closest ranks; None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in 0..100, got {q}")
    ordered = sorted(float(v) for v in values)
    if not ordered:
        return None
    pos = q / 100 * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values, percentiles=(50, 99), digits=None):
    """{n, mean, min, max, p50, p99, ...} of `values` (None for no values); rounded to `digits` when given."""
    values = [float(v) for v in values]
    if not values:
        return None
    out = {"n": len(values), "mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    for q in percentiles:
        out[f"p{q:g}"] = percentile(values, q)
    if digits is not None:
        out = {k: v if k == "n" else round(v, digits) for k, v in out.items()}
    return out
