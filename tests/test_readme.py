"""The README quotes measured numbers; these tests hold them to the files they come from.

Each quoted figure must equal its source to the digits printed (one unit of the last printed digit);
a range `a–b` is the smallest and largest value over the rows it summarises.
"""

import json
import os
import re

import pytest

from support import REPO

README = os.path.join(REPO, "README.md")
DOCS = os.path.join(REPO, "docs")


def _readme():
    with open(README) as f:
        return f.read()


def _table_row(text, label):
    """The cells after the label of the README table row that starts with `| label |`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"README has no table row {label!r}")


def _numbers(cell):
    """'10.3–10.8 ms' -> [(10.3, 1), (10.8, 1)]: each value with its printed decimals."""
    found = re.findall(r"\d[\d,]*(?:\.\d+)?", cell)
    assert found, f"no number in README cell {cell!r}"
    return [(float(n.replace(",", "")), len(n.split(".")[1]) if "." in n else 0) for n in found]


def _agrees(printed, decimals, value):
    return abs(printed - value) <= 10 ** -decimals


def _check(cell, values, scale=1.0):
    """The cell shows min–max of `values` (times `scale`) to its printed digits, or one number that every
    value rounds to."""
    values = [v * scale for v in values]
    printed = _numbers(cell)
    assert len(printed) in (1, 2), f"README cell {cell!r}: one number or a range"
    pairs = zip(printed, (min(values), max(values))) if len(printed) == 2 else ((printed[0], v) for v in values)
    for (number, decimals), value in pairs:
        assert _agrees(number, decimals, value), f"README says {cell!r}, the file says {values}"


def test_numbers_parse_with_their_digits():
    assert _numbers("3,150–3,177") == [(3150.0, 0), (3177.0, 0)]
    assert _agrees(10.3, 1, 10.293) and not _agrees(10.3, 1, 10.45)
    with pytest.raises(AssertionError):
        _check("10.3–10.8 ms", [10.29, 11.2])


def test_training_table_matches_the_benchmark_jsons():
    def run(name, stage, label):
        with open(os.path.join(DOCS, name)) as f:
            report = json.load(f)
        return next(r for r in report["baseline"] + report["stages"] + report["variants"]
                    if (r["stage"], r["run"]) == (stage, label)), report

    text = _readme()
    rows = {"stage 1, baseline (memory built in forward, checkpointing)": run("bench_train_h200.json", 1, "baseline"),
            "stage 1, memory built by the workers, no checkpointing, compiled layers": run("bench_train_h200.json", 1,
                                                                                            "compile"),
            "stage 2, baseline (memory built in forward, checkpointing, fp32 master)": run("bench_train_h200.json", 2,
                                                                                           "baseline"),
            "stage 2, workers, in-backward AdamW, no checkpointing, compiled layers": run(
                "bench_train_h200_stage2_fast.json", 2, "fast")}
    for label, (r, _) in rows.items():
        step, mfu, peak = _table_row(text, label)
        _check(step, [r["step_s"]])
        _check(mfu, [r["mfu"]], scale=100)
        _check(peak, [r["peak_gib_per_gpu"]])
    projection = rows["stage 2, workers, in-backward AdamW, no checkpointing, compiled layers"][1]["projection_7b"]
    assert f"projects to {projection['both_stages_hours']:.2f} h on 8 GPUs" in text


def test_realtime_table_matches_the_benchmark_json():
    with open(os.path.join(DOCS, "bench_h100.json")) as f:
        summary = {row["metric"]: row for row in json.load(f)["summary"]}
    text = _readme()

    def column(suffix, key):
        return [row[key] for metric, row in summary.items() if metric.startswith("[") and metric.endswith(suffix)]

    fast, stock = _table_row(text, "first token, flat from the stream start to 3 h")
    _check(fast, column("] question -> first token ms", "optimised"))
    _check(stock, column("] question -> first token ms", "stock"))
    fast, stock = _table_row(text, "one frame's encode + memory update + read, p99")
    _check(fast, column("] ingest p99 ms (encode+update+read)", "optimised"))
    _check(stock, column("] ingest p99 ms (encode+update+read)", "stock"))
    fast, stock = _table_row(text, "64-token answer")
    _check(fast, column("] question -> full answer ms", "optimised"))
    _check(stock, column("] question -> full answer ms", "stock"), scale=1e-3)  # printed in seconds
    fast, stock = _table_row(text, "decode tokens/s (target 175)")
    decode = summary["decode tokens/s, batch 1"]
    best = max(row["optimised"] for metric, row in summary.items() if metric.startswith("  decode-only tokens/s"))
    _check(fast, [best])
    _check(stock, [decode["stock"]])
    fast, stock = _table_row(text, "batched CLIP extraction, frames/s (target 3,000)")
    extraction = [row for metric, row in summary.items() if metric.startswith("extraction frames/s")]
    _check(fast, [row["optimised"] for row in extraction])
    _check(stock, [row["stock"] for row in extraction])
    fast, stock = _table_row(text, "peak memory")
    _check(fast, column("] peak GPU memory GB", "optimised"))
    _check(stock, column("] peak GPU memory GB", "stock"))


def test_demo_table_and_remarks_match_the_recorded_run():
    with open(os.path.join(DOCS, "demo_results.json")) as f:
        run = json.load(f)
    text = _readme()
    rows = run["accuracy"]
    columns = ["Flash-VStream (tiny)", "spatial-only", "majority answer"]
    for family in ("all", "spatial", "start", "order", "longest", "appeared"):
        cells = _table_row(text, family)
        assert len(cells) == len(columns), family
        for cell, column in zip(cells, columns):
            _check(cell, [rows[column][family]])
    background = run["accuracy_background_questions"]
    for family, column, quoted in (("spatial", "Flash-VStream (tiny)", "`spatial` is {}% with the full memory"),
                                   ("spatial", "spatial-only", "and {}%\n  spatial-only"),
                                   ("start", "Flash-VStream (tiny)", "`start` is {}% with the full memory"),
                                   ("start", "spatial-only", "and {}% spatial-only")):
        value = background[column][family]
        printed = f"{value:.1f}".rstrip("0").rstrip(".") if value % 1 else f"{value:.0f}"
        assert quoted.format(printed) in text, (quoted, value)
    assert f"({run['total_seconds']:.0f} s;" in text  # the run's time as recorded
    assert run["machine"]["cpus"] == 2 and "2-core CPU machine" in text
