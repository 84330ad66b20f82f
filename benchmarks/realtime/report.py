"""bench.json, the summary table (stock, optimised, baseline, ratios, the targets) and bench.png."""

import json
import os
import time

from benchmarks.common import log
from flash_vstream.utils.files import write_json

# Issue 8's targets on one H100
TARGETS = {"ttft_ms": 25.0, "ingest_p99_ms": 10.0, "decode_tokens_per_s": 175.0,
           "extraction_frames_per_s": 3000.0, "peak_mem_gb": 15.0}
# the quantized rows' targets (one H200): decode tokens/s at batch 1, first token, peak GPU memory
QUANTIZED_TARGETS = {"int8": {"decode_tokens_per_s": 420.0, "ttft_ms": 10.0, "peak_mem_gb": 9.0},
                     "int4": {"decode_tokens_per_s": 650.0, "ttft_ms": 10.0, "peak_mem_gb": 6.0}}


class Report:
    """bench.json: meta, targets, per-section results and the summary rows; `save()` rewrites it whole."""

    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, "bench.json")
        self.data = {"meta": {}, "targets": {**TARGETS, "quantized": QUANTIZED_TARGETS}, "sections": {}, "summary": []}

    def section(self, name):
        return self.data["sections"].setdefault(name, {"status": "pending", "notes": []})

    def save(self):
        write_json(self.path, self.data, indent=2, default=str)

    @classmethod
    def load(cls, output_dir):
        report = cls(output_dir)
        with open(report.path) as f:
            report.data = json.load(f)
        return report


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _ratio(num, den):
    return round(num / den, 2) if num is not None and den not in (None, 0) else None


def summarize(report):
    """Rows of the table: stock, optimised, baseline, ratios and the issue's targets."""
    s, rows = report.data["sections"], []

    def row(metric, stock, optimised, baseline=None, target=None, better="lower", note=""):
        if better == "lower":
            speedup, vs_base = _ratio(stock, optimised), _ratio(baseline, optimised)
            met = None if optimised is None or target is None else optimised <= target
        else:
            speedup, vs_base = _ratio(optimised, stock), _ratio(optimised, baseline)
            met = None if optimised is None or target is None else optimised >= target
        rows.append({"metric": metric, "stock": stock, "optimised": optimised, "baseline": baseline,
                     "speedup_vs_stock": speedup, "vs_baseline": vs_base, "target": target, "better": better,
                     "met": met, "note": note})

    for r in _get(s, "extraction", "rows") or []:
        row(f"extraction frames/s, batch {r['batch']}", r.get("stock_fps"), r.get("optimised_fps"),
            target=TARGETS["extraction_frames_per_s"], better="higher", note=r.get("optimised", ""))
    clip = s.get("clip_one_frame", {})
    row("one-frame CLIP ms (p50)", _get(clip, "stock_ms", "p50"), _get(clip, "optimised_ms", "p50"),
        note=clip.get("optimised", ""))
    dec = s.get("decode", {})
    row("decode tokens/s, batch 1", _get(dec, "stock", "tokens_per_s"), _get(dec, "optimised", "tokens_per_s"),
        target=TARGETS["decode_tokens_per_s"], better="higher",
        note=f"decode-only {_get(dec, 'optimised', 'decode_only_tokens_per_s')} tok/s; "
             f"{_get(dec, 'optimised', 'mode')}")
    for name, v in (dec.get("variants") or {}).items():
        row(f"  decode-only tokens/s: {name}", None, v.get("decode_only_tokens_per_s"), better="higher",
            note=f"{v.get('mode')}, setup {v.get('setup_ms')} ms")
    upstream = {r["frames"]: r.get("copy_ms") for r in _get(s, "baseline_upstream_buffer", "rows") or []}
    full = {r["frames"]: r for r in _get(s, "baseline_full_context", "rows") or []}
    for p in _get(s, "streaming", "positions") or []:
        at = p["position_frames"]
        label = "start" if at == 0 else _duration(at / _get(s, "streaming", "fps"))
        fc = full.get(at, {})
        fc_note = "" if not fc else f"full context: {fc.get('status')}"
        row(f"[{label}] ingest p99 ms (encode+update+read)", _get(p, "ingest_ms", "stock", "p99"),
            _get(p, "ingest_ms", "optimised", "p99"), baseline=upstream.get(at), target=TARGETS["ingest_p99_ms"],
            note="baseline: upstream buffer copy per update" if upstream.get(at) is not None else "")
        row(f"[{label}] memory update alone p99 ms", None, _get(p, "update_ms", "p99"))
        row(f"[{label}] question -> first token ms", _get(p, "ttft_ms", "stock", "p50"),
            _get(p, "ttft_ms", "optimised", "p50"), baseline=fc.get("ttft_ms"), target=TARGETS["ttft_ms"],
            note=fc_note)
        row(f"[{label}]   first token, prefix not cached ms", None, _get(p, "ttft_ms", "optimised_uncached", "p50"))
        row(f"[{label}]   prefix refresh after a frame ms", None, _get(p, "prefix_refresh_ms", "p50"),
            note="system text + memory into the KV cache, once per published frame")
        row(f"[{label}] question -> full answer ms", _get(p, "answer_ms", "stock", "p50"),
            _get(p, "answer_ms", "optimised", "p50"))
        row(f"[{label}] peak GPU memory GB", _get(p, "peak_mem_gb", "stock"), _get(p, "peak_mem_gb", "optimised"),
            baseline=fc.get("peak_mem_gb"), target=TARGETS["peak_mem_gb"], note=fc_note)
    later = [p for p in _get(s, "streaming", "positions") or [] if p["position_frames"] > 0]
    for key, name in (("ingest_ms", "ingest p99"), ("ttft_ms", "first token p50")):
        stat = "p99" if key == "ingest_ms" else "p50"
        values = [_get(p, key, "optimised", stat) for p in later]
        values = [v for v in values if v is not None]
        if len(values) >= 2:
            row(f"flatness of {name} (max/min over positions)", None, round(max(values) / min(values), 2),
                note="1.0 = flat from the first to the last position")
    bf16 = _get(dec, "optimised", "decode_only_tokens_per_s")
    for scheme, q in (_get(s, "quantized", "schemes") or {}).items():
        target = QUANTIZED_TARGETS.get(scheme, {})
        qdec = q.get("decode") or {}
        row(f"{scheme}: decode tokens/s, batch 1", bf16, _get(qdec, "optimised", "decode_only_tokens_per_s"),
            target=target.get("decode_tokens_per_s"), better="higher",
            note=f"stock column: bf16 decode-only; {_get(qdec, 'optimised', 'mode')}; tokens equal the quantized "
                 f"stock generate: {qdec.get('tokens_equal_stock')}")
        row(f"{scheme}: LLM weights GB", None, q.get("llm_gb"), note=f"peak while quantizing {q.get('quantize_peak_gb')}")
        bf16_positions = {p["position_frames"]: p for p in _get(s, "streaming", "positions") or []}
        for p in _get(q, "streaming", "positions") or []:
            at = p["position_frames"]
            label = "start" if at == 0 else _duration(at / _get(q, "streaming", "fps"))
            base = bf16_positions.get(at, {})
            row(f"{scheme} [{label}] question -> first token ms", _get(base, "ttft_ms", "optimised", "p50"),
                _get(p, "ttft_ms", "optimised", "p50"), target=target.get("ttft_ms"), note="stock column: bf16")
            row(f"{scheme} [{label}] ingest p99 ms", _get(base, "ingest_ms", "optimised", "p99"),
                _get(p, "ingest_ms", "optimised", "p99"), target=TARGETS["ingest_p99_ms"], note="stock column: bf16")
            row(f"{scheme} [{label}] peak GPU memory GB", _get(base, "peak_mem_gb", "optimised"),
                _get(p, "peak_mem_gb", "optimised"), target=target.get("peak_mem_gb"), note="stock column: bf16")
    fc = s.get("baseline_full_context", {})
    if fc.get("rows"):
        rows.append({"metric": "full context fits up to (frames)", "stock": None,
                     "optimised": None, "baseline": fc.get("fits_up_to_frames"), "speedup_vs_stock": None,
                     "vs_baseline": None, "target": None, "better": "", "met": None,
                     "note": (f"first out of memory at {fc['first_oom_frames']} frames" if fc.get("first_oom_frames")
                              else "no out-of-memory up to the largest size tried")})
    report.data["summary"] = rows
    return rows


def _duration(seconds):
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def finish(report, output_dir, started):
    summarize(report)
    try:
        plot(report, os.path.join(output_dir, "bench.png"))
        report.data["meta"].pop("plot_error", None)
    except Exception as error:  # noqa: BLE001 -- the numbers matter more than the picture
        report.data["meta"]["plot_error"] = f"{type(error).__name__}: {error}"
    report.data["meta"]["duration_s"] = round(time.perf_counter() - started, 1)
    report.save()


def print_table(report):
    meta = report.data["meta"]
    log("")
    log(f"Flash-VStream benchmark: {meta.get('device')} | torch {meta.get('torch')} | transformers "
        f"{meta.get('transformers')} | preset {meta.get('preset')} | {meta.get('dtype')} | {meta.get('weights')}")
    header = ("metric", "stock", "optimised", "baseline", "x stock", "x base", "target", "met", "note")
    widths = (50, 10, 10, 10, 8, 8, 9, 4, 0)
    log("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in report.data["summary"]:
        target = None if r["target"] is None else ("<=" if r["better"] == "lower" else ">=") + _fmt(r["target"])
        cells = (r["metric"], _fmt(r["stock"]), _fmt(r["optimised"]), _fmt(r["baseline"]),
                 _fmt(r["speedup_vs_stock"]), _fmt(r["vs_baseline"]), target or "-", _fmt(r["met"]), r["note"])
        log("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)))
    judged = [r["met"] for r in report.data["summary"] if r["met"] is not None]
    log(f"targets met: {sum(judged)} of {len(judged)} rows that have a target")
    statuses = {k: v.get("status") for k, v in report.data["sections"].items()}
    log("sections: " + ", ".join(f"{k}={v}" for k, v in statuses.items()))
    log("x stock: speed-up of optimised over stock; "
        "x base: baseline / optimised (times) or optimised / baseline (rates)")


def plot(report, path):
    # a figure of its own on an Agg canvas: no pyplot, so the process's matplotlib backend is left alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = report.data["sections"]
    positions = [p for p in _get(s, "streaming", "positions") or [] if p["position_frames"] > 0]
    x = [p["position_frames"] for p in positions]
    fig = Figure(figsize=(14, 5.5))
    FigureCanvasAgg(fig)
    lat, mem = fig.subplots(1, 2)

    def series(ax, xs, ys, label, **style):
        pts = [(a, b) for a, b in zip(xs, ys) if b is not None]
        if pts:
            ax.plot(*zip(*pts), marker=style.pop("marker", "o"), label=label, **style)

    series(lat, x, [_get(p, "ingest_ms", "optimised", "p99") for p in positions], "ingest p99, optimised", color="C0")
    series(lat, x, [_get(p, "ingest_ms", "stock", "p99") for p in positions], "ingest p99, stock", color="C0",
           linestyle="--")
    series(lat, x, [_get(p, "ttft_ms", "optimised", "p50") for p in positions], "first token, optimised", color="C1")
    series(lat, x, [_get(p, "ttft_ms", "stock", "p50") for p in positions], "first token, stock", color="C1",
           linestyle="--")
    n = _get(s, "decode", "answer_tokens") or report.data["meta"].get("answer_tokens")
    series(lat, x, [_get(p, "answer_ms", "optimised", "p50") for p in positions], f"{n}-token answer, optimised",
           color="C2")
    series(lat, x, [_get(p, "answer_ms", "stock", "p50") for p in positions], f"{n}-token answer, stock",
           color="C2", linestyle="--")
    up = [r for r in _get(s, "baseline_upstream_buffer", "rows") or [] if r.get("copy_ms") is not None]
    series(lat, [r["frames"] for r in up], [r["copy_ms"] for r in up], "(b) upstream buffer copy / update",
           color="C3", marker="s")
    fc = _get(s, "baseline_full_context", "rows") or []
    ok = [r for r in fc if r.get("status") == "ok"]
    series(lat, [r["frames"] for r in ok], [r["ttft_ms"] for r in ok], "(a) full context, first token",
           color="C4", marker="s")
    oom = [r["frames"] for r in fc if r.get("status") == "oom"]
    for ax in (lat, mem):
        for frames in oom:
            ax.axvline(frames, color="C4", linestyle=":", linewidth=1)
        if oom:
            ax.text(oom[0], 0.95, " (a) out of memory", color="C4", transform=ax.get_xaxis_transform(), va="top")
    lat.axhline(TARGETS["ingest_p99_ms"], color="gray", linestyle=":", linewidth=1)
    lat.axhline(TARGETS["ttft_ms"], color="gray", linestyle="-.", linewidth=1)
    lat.set(xscale="log", yscale="log", xlabel="stream length (frames at 1 fps)", ylabel="ms",
            title="latency (targets: ingest p99 10 ms, first token 25 ms)")
    if lat.get_legend_handles_labels()[0]:
        lat.legend(fontsize=7)
    series(mem, x, [_get(p, "peak_mem_gb", "optimised") for p in positions], "optimised", color="C0")
    series(mem, x, [_get(p, "peak_mem_gb", "stock") for p in positions], "stock", color="C0", linestyle="--")
    ok_mem = [r for r in ok if r.get("peak_mem_gb") is not None]
    series(mem, [r["frames"] for r in ok_mem], [r["peak_mem_gb"] for r in ok_mem], "(a) full context", color="C4",
           marker="s")
    mem.axhline(TARGETS["peak_mem_gb"], color="gray", linestyle=":", linewidth=1)
    mem.set(xscale="log", xlabel="stream length (frames at 1 fps)", ylabel="peak GPU memory (GB)",
            title="peak GPU memory (target 15 GB)")
    if mem.get_legend_handles_labels()[0]:
        mem.legend(fontsize=7)
    else:
        mem.text(0.5, 0.5, "no GPU memory numbers on this device", ha="center", transform=mem.transAxes)
    meta = report.data["meta"]
    fig.suptitle(f"Flash-VStream real-time path: {meta.get('device')}, preset {meta.get('preset')}, "
                 f"{meta.get('dtype')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def replot(output_dir):
    """Table and plot again from a bench.json (e.g. one fetched from a GPU machine without matplotlib)."""
    report = Report.load(output_dir)
    summarize(report)
    plot(report, os.path.join(output_dir, "bench.png"))
    report.data["meta"].pop("plot_error", None)
    report.save()
    print_table(report)
    return 0
