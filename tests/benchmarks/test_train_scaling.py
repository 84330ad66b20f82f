"""`python -m benchmarks.train --gpus N --compare-to ONE_GPU/bench_train.json`: each run's speed-up over its
one-GPU twin (same stage, run and ZeRO config, same per-GPU batch) and the per-GPU memory of both."""

import json
import subprocess
import sys

import pytest

from benchmarks import train as bench_train
from support import REPO

HEAD = dict(preset="7b", llm_params=6_738_415_616, batch_per_gpu=8, frames=60, tokens_per_sample=760)


def _report(gpus, rates, device="NVIDIA H200"):
    """A bench_train.json as the benchmark writes it: `rates` {(stage, run, zero): (samples/s, peak GiB)}."""
    runs = [{"stage": s, "run": r, "zero": z, "samples_per_s": v, "peak_gib_per_gpu": m}
            for (s, r, z), (v, m) in rates.items()]
    return {**HEAD, "device": device, "gpus": gpus, "baseline": [r for r in runs if r["run"] == "baseline"],
            "stages": [r for r in runs if r["run"] == "fast"], "variants": []}


def test_speedup_per_run_against_its_one_gpu_twin():
    one = _report(1, {(1, "fast", "zero2.json"): (40.0, 30.0), (2, "fast", "zero3.json"): (10.0, 120.0),
                      (1, "baseline", "zero2.json"): (20.0, 31.0)})
    two = _report(2, {(1, "fast", "zero2.json"): (78.0, 29.0), (2, "fast", "zero3.json"): (17.0, 70.0),
                      (1, "baseline", "zero2.json"): (30.0, 30.0), (2, "fast", "zero2.json"): (19.0, 90.0)})
    out = bench_train.scaling(two, one, "one/bench_train.json")
    assert (out["gpus"], out["compared_to"], out["compared_to_file"]) == (2, "NVIDIA H200", "one/bench_train.json")
    rows = {(r["stage"], r["run"], r["zero"]): r for r in out["runs"]}
    stage1 = rows[(1, "fast", "zero2.json")]
    assert stage1["speedup"] == pytest.approx(1.95) and stage1["efficiency"] == pytest.approx(0.975)
    assert (stage1["target"], stage1["met"]) == (1.9, True)
    stage2 = rows[(2, "fast", "zero3.json")]
    assert stage2["speedup"] == pytest.approx(1.7) and stage2["met"] is False
    assert (stage2["peak_gib_per_gpu"], stage2["one_gpu_peak_gib_per_gpu"]) == (70.0, 120.0)  # ZeRO-3 shards
    assert rows[(1, "baseline", "zero2.json")]["speedup"] == pytest.approx(1.5)
    unmatched = rows[(2, "fast", "zero2.json")]  # no one-GPU run under ZeRO-2 for stage 2
    assert "speedup" not in unmatched and "no one-GPU run" in unmatched["note"]
    table = bench_train.scaling_table(out)
    assert "| 1 | fast | zero2.json | 78.00 | 40.00 | 1.95x | 98% | 29.0 | 30.0 |" in table
    # 8 GPUs: the >= 7x target; 4 GPUs: none set
    eight = bench_train.scaling(_report(8, {(1, "fast", "zero2.json"): (290.0, 29.0)}), one)
    assert (eight["runs"][0]["target"], eight["runs"][0]["met"]) == (7.0, True)
    assert "target" not in bench_train.scaling(_report(4, {(1, "fast", "zero2.json"): (150.0, 29.0)}), one)["runs"][0]


@pytest.mark.parametrize("change, message", [
    ({"gpus": 2}, "a one-GPU bench_train.json is needed"),
    ({"batch_per_gpu": 4}, "batch_per_gpu 4"),
    ({"preset": "1b"}, "preset '1b'"),
    ({"frames": 8}, "frames 8"),
])
def test_a_comparison_of_different_measurements_is_refused(change, message):
    one = {**_report(1, {(1, "fast", "zero2.json"): (40.0, 30.0)}), **change}
    with pytest.raises(ValueError, match=message):
        bench_train.scaling(_report(2, {(1, "fast", "zero2.json"): (78.0, 29.0)}), one)


@pytest.mark.slow  # two tiny end-to-end runs under DeepSpeed ZeRO-2 (gloo on the CPU)
def test_one_then_two_processes_compared_on_cpu(tmp_path):
    common = ["--device", "cpu", "--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "4",
              "--clip-layers", "2", "--steps", "4", "--warmup-steps", "1", "--batch", "2", "--records", "16",
              "--frames", "8", "--workers", "0", "--stages", "1", "--no-baseline"]
    for gpus, extra in ((1, []), (2, ["--compare-to", str(tmp_path / "one" / "bench_train.json")])):
        result = subprocess.run([sys.executable, "-m", "benchmarks.train", "--output-dir", str(tmp_path / str(gpus)
                                 if gpus == 2 else tmp_path / "one"), "--gpus", str(gpus), *common, *extra],
                                capture_output=True, text=True, timeout=600, cwd=REPO)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads((tmp_path / "2" / "bench_train.json").read_text())
    (row,) = report["scaling"]["runs"]
    assert (row["stage"], row["run"], row["zero"]) == (1, "fast", "zero2.json")
    assert row["speedup"] > 0 and row["efficiency"] == pytest.approx(row["speedup"] / 2)
    assert (row["target"], row["met"]) == (1.9, row["speedup"] >= 1.9)
