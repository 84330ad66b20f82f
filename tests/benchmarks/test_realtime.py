"""The realtime benchmark on the tiny preset (CPU, seconds) and its script."""

import json
import os
import subprocess

import pytest

from benchmarks.realtime import __main__ as bench
from support import REPO


def test_bench_tiny_cpu_end_to_end(tmp_path):
    out = tmp_path / "bench"
    code = bench.main(["--preset", "tiny", "--device", "cpu", "--output-dir", str(out), "--positions", "5,20",
                       "--window", "2", "--answer-tokens", "4", "--strict"])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert {"meta", "targets", "sections", "summary"} <= set(report)
    for key in ("device", "torch", "transformers", "preset", "dtype", "duration_s"):
        assert key in report["meta"]
    assert report["targets"]["ttft_ms"] == 25.0 and report["targets"]["peak_mem_gb"] == 15.0
    sections = report["sections"]
    assert set(bench.SECTIONS) | {"build"} == set(sections)
    assert sections.pop("quantized")["status"] == "skipped"  # without --quantized (its own test below)
    assert sections.pop("vision_split")["status"] == "skipped"  # without --vision-device (test_vision_device.py)
    assert all(s["status"] == "ok" for s in sections.values()), {k: s.get("error") for k, s in sections.items()}

    clip = sections["clip_one_frame"]
    assert clip["stock_ms"]["p50"] > 0 and clip["optimised_ms"]["p50"] > 0
    assert clip["truncated_vs_stock_rel_err"] < 1e-6  # the fast encoder returns what CLIPVisionTower returns

    decode = sections["decode"]
    assert decode["memory_tokens"] == 681
    assert decode["stock"]["new_tokens"] == decode["optimised"]["new_tokens"] == 4  # EOS ignored: forced length
    assert decode["tokens_equal_stock"]

    streaming = sections["streaming"]
    assert [p["position_frames"] for p in streaming["positions"]] == [0, 5, 20]
    for p in streaming["positions"]:
        assert p["frames_seen"] >= p["position_frames"]
        for key in ("ingest_ms", "ttft_ms", "answer_ms"):
            assert p[key]["stock"]["n"] >= 1 and p[key]["optimised"]["p99"] > 0
        assert p["update_ms"]["n"] == 2
        assert p["ttft_ms"]["optimised_uncached"]["n"] >= 1 and p["prefix_refresh_ms"]["p50"] > 0
        assert p["cached_prefix_answer_equal_uncached"]  # fp32 on the CPU: exactly the same answer
        assert set(p["peak_mem_gb"]) == {"stock", "optimised"}  # None on CPU
    assert streaming["positions"][-1]["memory_tokens"] == 681

    upstream = sections["baseline_upstream_buffer"]["rows"]
    assert [r["frames"] for r in upstream] == [5, 20]
    assert upstream[1]["buffer_bytes"] == 20 * 64 * 32 * 2 and upstream[1]["copy_ms"] > 0
    full = sections["baseline_full_context"]
    assert [r["frames"] for r in full["rows"]] == [5, 20] and all(r["status"] == "ok" for r in full["rows"])
    assert full["rows"][1]["tokens"] == 20 * 64
    extraction = sections["extraction"]["rows"]
    assert [r["batch"] for r in extraction] == [2, 4] and all(r["optimised_fps"] > 0 for r in extraction)

    metrics = [r["metric"] for r in report["summary"]]
    assert "decode tokens/s, batch 1" in metrics and any("ingest p99" in m for m in metrics)
    png = out / "bench.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_script_runs_selected_sections(tmp_path):
    """scripts/benchmark.sh passes its flags through; skipped sections are recorded as such."""
    script = os.path.join(REPO, "scripts", "benchmark.sh")
    skip = "decode,streaming,baseline_full_context,extraction"
    result = subprocess.run(["bash", script, str(tmp_path), "--preset", "tiny", "--device", "cpu", "--positions", "3",
                             "--strict", "--skip", skip], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "one-frame CLIP ms" in result.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    statuses = {k: v["status"] for k, v in report["sections"].items()}
    assert statuses == {"build": "ok", "clip_one_frame": "ok", "baseline_upstream_buffer": "ok",
                        "quantized": "skipped", "vision_split": "skipped", **{k: "skipped" for k in skip.split(",")}}
    assert (tmp_path / "bench.png").exists()
    with pytest.raises(SystemExit):
        bench.parse_args(["--output-dir", str(tmp_path), "--skip", "nonsense"])


def test_quantized_rows_on_cpu(tmp_path):
    """--quantized int8,int4: the decode section again over each scheme quantized from the bench's weights
    (CPU: the plain static-cache loop over the dequantizing layers), with its rows in the summary."""
    skip = "clip_one_frame,streaming,vision_split,baseline_upstream_buffer,baseline_full_context,extraction"
    code = bench.main(["--preset", "tiny", "--device", "cpu", "--output-dir", str(tmp_path), "--answer-tokens", "3",
                       "--strict", "--skip", skip, "--quantized", "int8,int4"])
    assert code == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    quantized = report["sections"]["quantized"]
    assert quantized["status"] == "ok" and set(quantized["schemes"]) == {"int8", "int4"}
    for scheme, entry in quantized["schemes"].items():
        assert entry["status"] == "ok" and entry["layers"] == 2 * 7 + 1, entry.get("error")
        assert entry["decode"]["optimised"]["new_tokens"] == 3
        assert entry["decode"]["tokens_equal_stock"]  # the same dequantized arithmetic as the quantized generate
    rows = {r["metric"]: r for r in report["summary"]}
    assert rows["int4: decode tokens/s, batch 1"]["target"] == 650.0 and rows["int8: LLM weights GB"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--output-dir", str(tmp_path), "--quantized", "int3"])


def test_watchdog_ends_a_run_that_overstays(tmp_path):
    """--hard-limit-s ends the process with tracebacks (a hung CUDA call cannot hold the run past it)."""
    import subprocess
    import sys
    import time

    started = time.time()
    result = subprocess.run([sys.executable, "-m", "benchmarks.realtime", "--output-dir", str(tmp_path),
                             "--preset", "tiny", "--device", "cpu", "--hard-limit-s", "0.5"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode != 0
    assert "Timeout" in result.stderr and "Thread" in result.stderr
    assert time.time() - started < 100


def test_plot_leaves_pyplot_alone(tmp_path):
    """bench.png is drawn on a figure of its own (Agg canvas): pyplot and the process's backend untouched."""
    import sys

    position = {"position_frames": 60, "ingest_ms": {"optimised": {"p99": 3.0}, "stock": {"p99": 30.0}},
                "ttft_ms": {"optimised": {"p50": 10.0}, "stock": {"p50": 40.0}},
                "answer_ms": {"optimised": {"p50": 300.0}}, "peak_mem_gb": {"optimised": 14.0}}
    (tmp_path / "bench.json").write_text(json.dumps(
        {"meta": {"device": "test"}, "targets": {}, "summary": [],
         "sections": {"streaming": {"fps": 1.0, "positions": [position, {**position, "position_frames": 600}]}}}))
    code = ("import sys; from benchmarks.realtime.report import Report, plot; "
            "plot(Report.load(sys.argv[1]), sys.argv[1] + '/bench.png'); "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sections_leave_the_collector_alone(tmp_path):
    """gc.freeze() is the entry point's (process-wide): a Bench without freeze_heap freezes nothing."""
    import gc
    import time

    import torch

    from benchmarks.realtime.build import PRESETS, Bench, build
    from benchmarks.realtime.report import Report
    from benchmarks.realtime.sections import run_section

    args = bench.parse_args(["--output-dir", str(tmp_path), "--preset", "tiny", "--device", "cpu",
                             "--positions", "3", "--window", "1", "--answer-tokens", "2"])
    b = Bench(args=args, preset=PRESETS["tiny"], device=torch.device("cpu"), dtype=torch.float32,
              report=Report(str(tmp_path)), deadline=time.perf_counter() + 120)
    build(b)
    frozen = gc.get_freeze_count()
    run_section(b, "streaming")
    streaming = b.report.data["sections"]["streaming"]
    assert streaming["status"] == "ok", streaming.get("error")
    assert gc.get_freeze_count() == frozen
    assert all("gc_full_collection_ms" not in p for p in streaming["positions"])


def test_strict_is_the_default(tmp_path):
    """The benchmark runs the fast path strict (a part that cannot run fails its section) unless --no-strict."""
    assert bench.parse_args(["--output-dir", str(tmp_path)]).strict is True
    assert bench.parse_args(["--output-dir", str(tmp_path), "--no-strict"]).strict is False
