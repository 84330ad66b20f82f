"""benchmarks/ingest.py on the CPU with the tiny shapes: both paths run, the JSON holds the table's fields, and the
memory part of the two paths is bit-identical (the same check the GPU run reports)."""

import json

from benchmarks.ingest import main


def test_ingest_benchmark_smoke(tmp_path):
    out = tmp_path / "ingest.json"
    main(["--preset", "tiny", "--device", "cpu", "--sizes", "1,3", "--ticks", "1", "--output", str(out)])
    report = json.loads(out.read_text())
    assert report["memory_identical"]["identical"] is True and report["memory_identical"]["max_abs_diff"] == 0
    assert report["clip_batched_eager_vs_one_frame_max_abs_diff"] < 1e-4
    assert [row["streams"] for row in report["rows"]] == [1, 3]
    for row in report["rows"]:
        for path in ("batched_eager", "loop"):
            assert row[path]["ms_p50"] > 0 and row[path]["frames_per_s"] > 0 and row[path]["ticks"] == 1
        assert row["speedup"] > 0 and row["state_gb"] > 0
