"""Benchmark of batched ingest (not a test): N streams with one new frame each per engine tick.

    python -m benchmarks.ingest --output ingest.json                          # CLIP-L/14 shape, on CUDA
    python -m benchmarks.ingest --preset tiny --device cpu --sizes 1,4 --output /tmp/i.json   # smoke run

One tick = what the engine's ingest lane does for N sessions that each have one new frame: CLIP encode,
STAR memory update and the read that publishes (memory tokens, timestamps, weights). Two paths, in the
same run, on the same frames:
  loop     the engine before batching: one session after another, its frame encoded alone (the fast
           encoder's one-frame CUDA graph) and its memory updated alone (a batch of one);
  batched  one CLIP batch for the N frames, one `MemoryStack.update` of the N memories, one read of all
           (`serve/batching.py` makes the same calls); CLIP once through the tower's own modules (what a
           session's fast path runs for a batch unless its options compile the batched path) and once
           through the compiled fused path (`FastVisionEncoder.compile`).
The weights are random with the real shapes (CLIP ViT-L/14-224; the released memory sizes: 681 tokens,
a 300-frame buffer); the memories are filled past their 26th frame first (untimed), so every tick runs the
steady-state update (closest-pair merge, retrieval over the buffer). Frames are random normalised pixels:
decoding and resizing (CPU work per frame, the same on both paths) are not in these numbers.
Reports ms per tick (p50), frames/s, the ratio batched / loop, the peak GPU memory of the tick and the
bytes of the memory state; and whether the memories of the two paths are bit-identical when fed the same
features (the memory part alone), and how far the batched CLIP features are from the one-frame ones.
"""

import argparse
import statistics
import time

import torch

from benchmarks.common import DTYPES, VIT_L14, environment, log, peak_gb, random_clip_tower, reset_peak, timed_ms
from flash_vstream.model.language_model.configuration_vstream import PATCH_GRID
from flash_vstream.model.memory import MemoryStack, SemanticAttention, STARMemory
from flash_vstream.runtime.fast_path import FastPath
from flash_vstream.runtime.options import FastPathOptions
from flash_vstream.runtime.vision import FastVisionEncoder
from flash_vstream.utils.files import write_json

SIZES = (1, 16, 64, 256, 1024)
FILL_FRAMES = 30  # frames each memory holds before the timed ticks: temporal memory full (k + 1 -> merge)


def memory_config(preset, memory_mode):
    from flash_vstream.demo.tiny import tiny_vstream_config
    from flash_vstream.model import VStreamConfig

    if preset == "tiny":
        config = tiny_vstream_config(vocab_size=512, clip_dir=None, memory_mode=memory_mode)
    else:  # the released memory sizes (the defaults) at CLIP-L width
        config = VStreamConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                               vocab_size=64, mm_hidden_size=1024, memory_mode=memory_mode)
    return config


def vision_config(preset):
    from transformers import CLIPVisionConfig

    if preset == "tiny":
        from flash_vstream.demo.tiny import tiny_clip_config

        return tiny_clip_config()
    return CLIPVisionConfig(**VIT_L14)


class Streams:
    """N memories in one stack, filled to the steady state with random features."""

    def __init__(self, config, attention, n, device, dtype, seed):
        self.stack = MemoryStack(config, device, dtype, attention, capacity=n)
        self.memories = [STARMemory(config, attention, seed=seed + i).join(self.stack) for i in range(n)]
        self.frames = 0

    def feed(self, features):
        """One frame (n, 256, D) for every memory, batched."""
        self.stack.update(self.memories, features, [self.frames] * len(self.memories))
        self.frames += 1


def random_features(n, config, device, dtype, generator):
    return torch.randn(n, PATCH_GRID**2, config.mm_hidden_size, device=device, dtype=dtype, generator=generator)


def loop_tick(streams, encoder, pixels):
    """The engine before batching: one session after another (encode alone, update alone, read)."""
    t = float(streams.frames)
    for i, memory in enumerate(streams.memories):
        features = encoder(pixels[i:i + 1])  # (1, 256, D): the one-frame CUDA graph
        memory.update(features, [t])
        memory.read()
        memory.describe()
    streams.frames += 1


def batched_memory(streams, features):
    """The memory part of a batched tick: every memory's update, readout and description, batched."""
    streams.feed(features)
    streams.stack.read(streams.memories)
    streams.stack.describe(streams.memories)


def batched_tick(streams, encode, pixels):
    batched_memory(streams, encode(pixels))  # (N, 256, D)


def time_ticks(device, tick, ticks, warmup=1):
    for _ in range(warmup):
        tick()
    return [timed_ms(device, tick)[0] for _ in range(ticks)]


def memory_identity(config, attention, device, dtype, n, frames, seed):
    """The memory part alone: n lone memories and the same n in one stack, fed the same features -> (identical
    tokens, timestamps and weights, max |difference| of the tokens)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    lone = [STARMemory(config, attention, seed=seed + i) for i in range(n)]
    stacked = Streams(config, attention, n, device, dtype, seed)
    for f in range(frames):
        features = random_features(n, config, device, dtype, generator)
        for i, memory in enumerate(lone):
            memory.update(features[i:i + 1], [float(f)])
        stacked.feed(features)
    same, worst = True, 0.0
    for a, b, tokens in zip(lone, stacked.memories, stacked.stack.read(stacked.memories)):
        mine = a.read()
        same &= torch.equal(mine, tokens) and a.describe() == b.describe()
        worst = max(worst, (mine.float() - tokens.float()).abs().max().item())
    return bool(same), worst


def run(args):
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    cuda = device.type == "cuda"
    report = {"environment": environment(device), "args": vars(args), "rows": [], "notes": []}
    deadline = time.perf_counter() + args.time_budget_s
    config = memory_config(args.preset, args.memory_mode)
    torch.manual_seed(args.seed)
    attention = SemanticAttention.from_seed(config.mm_hidden_size, config.abstract_hidden_dim, args.seed)
    attention.to(device=device, dtype=dtype)
    tower = random_clip_tower(vision_config(args.preset), device, dtype, seed=args.seed + 1)
    options = FastPathOptions(enabled=True, compile_vision=cuda, strict=args.strict)
    fast_path = FastPath(options=options, tower=tower).fuse_weights()
    encoder = fast_path.vision(prepare=False)
    size = tower.config.image_size
    graph_ms, _ = timed_ms(device, encoder.capture, size) if cuda else (0.0, None)
    eager = FastVisionEncoder(tower.vision_tower, tower.select_layer, tower.select_feature)
    paths = {"batched_eager": lambda p: eager.eager(p)}
    if cuda:
        encoder.compile(triton=None)
        compiled_ms, _ = timed_ms(device, encoder, torch.randn(2, 3, size, size, device=device, dtype=dtype))
        report["compile_s"] = round(compiled_ms / 1e3, 1)
        paths["batched_compiled"] = encoder
    report.update(graph_capture_s=round(graph_ms / 1e3, 2), fast_path=fast_path.describe(),
                  memory_mode=config.memory_mode, memory_tokens=681 if args.preset == "7b" else None)
    log(f"built in {args.time_budget_s - (deadline - time.perf_counter()):.1f} s: {fast_path.options.summary()}")

    same, worst = memory_identity(config, attention, device, dtype, n=min(16, max(args.sizes)), frames=FILL_FRAMES + 5,
                                  seed=args.seed)
    report["memory_identical"] = {"streams": min(16, max(args.sizes)), "frames": FILL_FRAMES + 5, "identical": same,
                                  "max_abs_diff": worst}
    log(f"memory part, lone vs stacked, same features: identical={same} (max |diff| {worst:.3g})")
    pixels = torch.randn(8, 3, size, size, device=device, dtype=dtype)
    one = torch.cat([encoder(pixels[i:i + 1]) for i in range(8)]).float()
    for name, encode in paths.items():
        diff = (encode(pixels).float() - one).abs().max().item()
        report[f"clip_{name}_vs_one_frame_max_abs_diff"] = diff
        log(f"CLIP {name} vs one-frame features: max |diff| {diff:.3g} (feature scale {one.abs().max().item():.3g})")

    generator = torch.Generator(device=device).manual_seed(args.seed)
    per_frame_loop_ms = 0.0
    for n in args.sizes:
        if time.perf_counter() > deadline:
            report["notes"].append(f"N={n} and larger skipped: time budget spent")
            break
        row = measure(args, n, size, config, attention, encoder, paths, generator, deadline, per_frame_loop_ms,
                      report)
        if row["loop"] is not None:
            per_frame_loop_ms = row["loop"]["ms_p50"] / n
        report["rows"].append(row)
        log(format_row(row, paths))
        write_json(args.output, report)
        if cuda:
            torch.cuda.empty_cache()
    log(table(report, paths))
    write_json(args.output, report)
    return report


def measure(args, n, size, config, attention, encoder, paths, generator, deadline, per_frame_loop_ms, report):
    """One row of the table: N streams filled to the steady state, then the batched paths and the loop."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    streams = Streams(config, attention, n, device, dtype, args.seed)
    for _ in range(FILL_FRAMES):
        streams.feed(random_features(n, config, device, dtype, generator))
    pixels = torch.randn(n, 3, size, size, device=device, dtype=dtype, generator=generator)
    row = {"streams": n, "state_gb": round(state_bytes(streams.stack) / 1e9, 3)}
    for name, encode in paths.items():
        reset_peak(device)
        ms = time_ticks(device, lambda: batched_tick(streams, encode, pixels), args.ticks)
        row[name] = tick_row(ms, n, peak_gb(device))
        encode_ms = time_ticks(device, lambda: encode(pixels), args.ticks, warmup=0)
        row[name]["clip_ms"] = round(statistics.median(encode_ms), 2)
    features = random_features(n, config, device, dtype, generator)
    memory_ms = time_ticks(device, lambda: batched_memory(streams, features), args.ticks)
    row["batched_memory_only_ms"] = round(statistics.median(memory_ms), 2)
    loop_ticks = args.ticks if n <= 64 else max(1, args.ticks // 2)
    expected_s = (loop_ticks + 1) * n * per_frame_loop_ms / 1e3  # from the smaller N already run
    row["loop"] = None
    if time.perf_counter() + expected_s > deadline:
        report["notes"].append(f"N={n}: the loop was not run (about {expected_s:.0f} s, past the time budget)")
    else:
        reset_peak(device)
        ms = time_ticks(device, lambda: loop_tick(streams, encoder, pixels), loop_ticks)
        row["loop"] = tick_row(ms, n, peak_gb(device))
        row["speedup"] = round(row["loop"]["ms_p50"] / min(row[name]["ms_p50"] for name in paths), 2)
    return row


def state_bytes(stack):
    return stack.row_nbytes * stack.capacity  # every row the stack holds, used or not


def tick_row(ms, n, peak):
    p50 = statistics.median(ms)
    return {"ms_p50": round(p50, 2), "ms_max": round(max(ms), 2), "ticks": len(ms),
            "frames_per_s": round(1e3 * n / p50, 1), "peak_gb": peak}


def format_row(row, paths):
    parts = [f"N={row['streams']:5d}"]
    for name in (*paths, "loop"):
        r = row.get(name)
        cell = "-" if r is None else "%.1f ms (%.0f f/s)" % (r["ms_p50"], r["frames_per_s"])
        parts.append(f"{name} {cell}")
    parts.append(f"speedup {row.get('speedup', '-')}x, memory-only {row['batched_memory_only_ms']} ms, "
                 f"state {row['state_gb']} GB")
    return " | ".join(parts)


def table(report, paths):
    names = (*paths, "loop")
    lines = ["| N | " + " | ".join(f"{n} ms/tick (frames/s)" for n in names) + " | speedup | memory only ms | peak GB |",
             "|---" * (len(names) + 4) + "|"]
    for row in report["rows"]:
        cells = []
        for name in names:
            r = row.get(name)
            cells.append("–" if r is None else f"{r['ms_p50']:.1f} ({r['frames_per_s']:,.0f})")
        peak = max((row[n]["peak_gb"] or 0) for n in paths)
        lines.append(f"| {row['streams']} | " + " | ".join(cells) + f" | {row.get('speedup', '–')}x | "
                     f"{row['batched_memory_only_ms']} | {peak} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSON report path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--preset", choices=("7b", "tiny"), default="7b", help="7b: CLIP-L/14 and D=1024")
    parser.add_argument("--memory-mode", choices=("paper", "upstream"), default="paper")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=list(SIZES))
    parser.add_argument("--ticks", type=int, default=4, help="timed ticks per path and N (the loop: half above N=64)")
    parser.add_argument("--time-budget-s", type=float, default=100.0, help="larger N are skipped past it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-strict", dest="strict", action="store_false", help="let fast-path parts fall back")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    run(args)


if __name__ == "__main__":
    main()
