"""The one sharding rule and the one percentile rule."""

import numpy as np
import pytest

from flash_vstream.utils.sharding import shard, shard_bounds
from flash_vstream.utils.stats import percentile, summary


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 101])
@pytest.mark.parametrize("num_chunks", [1, 2, 3, 4, 8])
def test_shards_cover_every_item_exactly_once_in_order(n, num_chunks):
    items = list(range(n))
    chunks = [shard(items, num_chunks, i) for i in range(num_chunks)]
    assert [x for c in chunks for x in c] == items
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1  # balanced


def test_shard_bounds_known_answers_and_bad_indices():
    assert [shard_bounds(10, 3, i) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert [shard(list(range(10)), 4, i) for i in range(4)] == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    for bad in ((10, 3, 3), (10, 3, -1), (10, 0, 0)):
        with pytest.raises(ValueError):
            shard_bounds(*bad)


def test_percentile_interpolates_like_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 100):
        values = rng.exponential(size=n).tolist()
        for q in (0, 1, 25, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12)
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_summary():
    assert summary([3, 1, 2, 4]) == {"n": 4, "mean": 2.5, "min": 1.0, "max": 4.0, "p50": 2.5,
                                     "p99": pytest.approx(3.97)}
    assert summary([1, 2], percentiles=(95,), digits=1) == {"n": 2, "mean": 1.5, "min": 1.0, "max": 2.0, "p95": 1.9}
    assert summary([]) is None
