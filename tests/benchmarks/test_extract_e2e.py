"""benchmarks/extract.py --e2e on CPU: every part runs, the paths see the same frames of the same files, the
ratios come from the measured rates; the old path's subset keeps the set's mix of heights."""

import json

from benchmarks import extract as bench


def test_proportional_keeps_each_height():
    paths = [f"360p_{i:04d}.mp4" for i in range(128)] + [f"720p_{i:04d}.mp4" for i in range(8)] + ["1080p_0000.mp4"]
    half = bench.proportional(paths, 0.5)
    assert half == paths[:64] + paths[128:132] + ["1080p_0000.mp4"]  # a height with one file keeps it
    assert bench.proportional(paths, 1.0) == paths
    assert bench.proportional(paths, 0.001) == ["360p_0000.mp4", "720p_0000.mp4", "1080p_0000.mp4"]


def test_bench_extract_e2e_tiny_smoke(tmp_path):
    """`--e2e` over the repository's clip and a 144p variant it encodes: the decode limit, the encoder, saving,
    the new and the old path over the same files (the old one's cap left wide: all files), the ratios."""
    out = tmp_path / "e2e.json"
    assert bench.main(["--tiny", "--device", "cpu", "--e2e", "--only-e2e", "--e2e-set", "360:2,144:1",
                       "--e2e-workers", "2", "--e2e-old-seconds", "1000", "--output", str(out)]) == 0
    e = json.loads(out.read_text())["e2e_compare"]
    assert e["files"] == 3 and e["variants"]["144"]["height"] == 144 and e["variants"]["360"]["copies"] == 2
    assert [r["workers"] for r in e["scaling"]][:2] == [1, 2]
    frames = e["decode_only"]["frames"]  # every path samples the same frames of the same files
    assert frames > 0 and e["new"]["frames"] == e["old"]["frames"] == frames and e["old"]["files"] == 3
    assert e["new"]["failed"] == e["old"]["failed"] == e["old"]["first_run"]["failed"] == 0
    assert e["old"]["first_run"]["files"] == 2  # 1/16 of each height, at least one file each
    assert e["save_only"]["frames"] > 0 and e["new"]["parent_cpu_ms_per_frame"] > 0
    limit = min(e["decode_only"]["frames_per_s"], e["encoder"]["frames_per_s"])
    assert abs(e["new_over_limit"] - e["new"]["frames_per_s"] / limit) < 0.01
    assert abs(e["new_over_old"] - e["new"]["frames_per_s"] / e["old"]["frames_per_s"]) < 0.01


def test_nvdec_rate_says_why_when_the_library_is_missing(example_mp4):
    """Without PyNvVideoCodec (the CPU suite) the NVDEC measurement reports the import error instead of a rate."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("PyNvVideoCodec") is not None:
        pytest.skip("PyNvVideoCodec is installed: its rate needs a GPU")
    result = bench.bench_nvdec([example_mp4], 1.0)
    assert set(result) == {"error"} and "PyNvVideoCodec" in result["error"]
