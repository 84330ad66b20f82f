"""Benchmark of the real-time path on one GPU, side by side with the stock stack and two baselines.

    python -m benchmarks.realtime --output-dir DIR                        # 7B-shaped, random bf16 weights
    python -m benchmarks.realtime --output-dir DIR --model-path ckpt/Flash-VStream-7b
    python -m benchmarks.realtime --output-dir DIR --preset tiny --device cpu     # smoke run (tests)

The command line; the package docstring says what is measured. This entry point alone owns the
process-wide state: the watchdog (`--hard-limit-s`) and the heap freeze before each ingest window.
"""

import argparse
import faulthandler
import gc
import os
import sys
import time
import traceback

import torch

from benchmarks.common import DTYPES, environment, log
from benchmarks.realtime.build import PRESETS, Bench, build
from benchmarks.realtime.report import Report, finish, print_table, replot
from benchmarks.realtime.sections import SECTIONS, run_section


def freeze_heap():
    """As the realtime CLI does after warming up: the heap built so far (compiled code, graphs) is frozen
    out of the collector's scans. Returns the milliseconds of the full collection that runs first."""
    started = time.perf_counter()
    gc.collect()
    ms = round(1e3 * (time.perf_counter() - started), 2)
    gc.freeze()
    return ms


def _ints(text):
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.realtime", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="7b", help="model shapes and iteration counts")
    p.add_argument("--model-path", default=None, help="a real checkpoint instead of random weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vision-device", default=None,
                   help="e.g. cuda:1: the vision_split section, CLIP + memory there vs beside the LLM on --device")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--positions", type=_ints, default=None,
                   help="stream positions in frames (1 fps), e.g. 60,600,3600,10800")
    p.add_argument("--window", type=int, default=None, help="frames timed with real encoding at each position")
    p.add_argument("--batches", type=_ints, default=None, help="extraction batch sizes")
    p.add_argument("--answer-tokens", type=int, default=None, help="forced answer length (default 64; EOS ignored)")
    p.add_argument("--full-context-frames", type=_ints, default=None, help="frame counts of baseline (a)")
    p.add_argument("--max-context-tokens", type=int, default=None, help="cap of baseline (a); max_position_embeddings")
    p.add_argument("--memory-mode", choices=("paper", "upstream"), default=None, help="override config.memory_mode")
    p.add_argument("--clip-compile", choices=("auto", "on", "off"), default="auto", help="auto: on CUDA only")
    p.add_argument("--decode-compile", choices=("auto", "off"), default="auto",
                   help="auto: also try the torch.compile'd decode step inside the CUDA graph (CUDA only)")
    p.add_argument("--decode-compile-mode", default=None,
                   help="torch.compile mode of the decode step (e.g. max-autotune-no-cudagraphs; default: inductor's)")
    p.add_argument("--clip-compile-mode", default=None,
                   help="torch.compile mode of the batched CLIP layers (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--quantized", type=lambda t: tuple(x for x in t.split(",") if x), default=(),
                   help="int8,int4: the decode and streaming sections again with the LLM quantized (section "
                        "'quantized', after the others)")
    p.add_argument("--decode-variants", type=lambda t: tuple(x for x in t.split(",") if x), default=(),
                   help="only these decoder variants in the decode sections (e.g. triton_compiled_cuda_graph)")
    p.add_argument("--time-budget-s", type=float, default=None, help="sections shorten or skip past this")
    p.add_argument("--hard-limit-s", type=float, default=None,
                   help="watchdog: dump every thread's traceback and exit after this many seconds, even when "
                        "stuck inside CUDA (a hung graph capture or compile); default: time budget + 120 s")
    p.add_argument("--fill-budget-s", type=float, default=None, help="time to reach the last stream position")
    p.add_argument("--skip", type=lambda t: tuple(x for x in t.split(",") if x), default=(),
                   help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                   help="a fast-path part that cannot run raises (its section fails, naming it) and a failed "
                        "section exits 1 (default); --no-strict: fall back, note it in the section, exit 0")
    p.add_argument("--replot", action="store_true",
                   help="only redraw bench.png and reprint the table from OUTPUT_DIR/bench.json (no measuring)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for name in ("positions", "window", "batches", "answer_tokens", "max_context_tokens", "time_budget_s",
                 "fill_budget_s", "full_context_frames"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    bad = set(args.quantized) - {"int8", "int4"}
    if bad:
        p.error(f"unknown --quantized schemes {sorted(bad)}; known: int8, int4")
    unknown = set(args.skip) - set(SECTIONS)
    if unknown:
        p.error(f"unknown --skip sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    if args.window < 1 or args.answer_tokens < 1:
        p.error("--window and --answer-tokens must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        return replot(args.output_dir)
    # A C-level watchdog thread: it fires even while the main thread is blocked in a CUDA call, so a
    # hang ends with tracebacks and the sections saved so far instead of an outside kill with nothing.
    faulthandler.dump_traceback_later(args.hard_limit_s or args.time_budget_s + 120, exit=True)
    frozen_before = gc.get_freeze_count()
    try:
        return run(args, argv)
    finally:
        faulthandler.cancel_dump_traceback_later()
        if not frozen_before:
            gc.unfreeze()  # an in-process caller (the tests) gets its collector back as it was


def run(args, argv=None):
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    os.makedirs(args.output_dir, exist_ok=True)
    report = Report(args.output_dir)
    b = Bench(args=args, preset=PRESETS[args.preset], device=device, dtype=DTYPES[args.dtype], report=report,
              deadline=started + args.time_budget_s, freeze_heap=freeze_heap)
    report.data["meta"] = {**environment(device), "preset": args.preset, "dtype": args.dtype,
                           "weights": args.model_path or "random", "argv": sys.argv if argv is None else list(argv),
                           "started_unix": time.time(), "time_budget_s": args.time_budget_s,
                           "answer_tokens": args.answer_tokens, "positions": list(args.positions)}
    try:
        build(b)
    except Exception as error:  # noqa: BLE001 -- nothing to measure without the models
        report.section("build").update(status="failed", error=f"{type(error).__name__}: {error}",
                                       traceback=traceback.format_exc().splitlines()[-15:])
        report.save()
        log(f"build FAILED: {type(error).__name__}: {error}")
        return 1
    log(f"built in {report.data['sections']['build']['seconds']} s on {report.data['meta']['device']}")
    report.save()
    for name in SECTIONS:
        run_section(b, name)
        finish(report, args.output_dir, started)  # table data and plot so far: a killed run keeps them
    print_table(report)
    log(f"wrote {report.path} in {report.data['meta']['duration_s']} s")
    failed = [k for k, v in report.data["sections"].items() if v.get("status") == "failed"]
    if failed:
        log(f"FAILED sections: {', '.join(failed)}")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
