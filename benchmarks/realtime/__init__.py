"""Benchmark of the real-time path on one GPU, side by side with the stock stack and two baselines.

    python -m benchmarks.realtime --output-dir DIR [--preset tiny --device cpu] [--model-path CKPT]

One process builds the models (`build`: Vicuna-7B / CLIP-L/14 shapes with random weights, or a
checkpoint) and measures six sections in order (`sections`: one-frame CLIP, decode, streaming, the two
baselines of `baselines`, extraction). Each section records its status, notes and fallbacks; a failed
section does not stop the others, and bench.json is rewritten after every section.

Outputs (`report`): DIR/bench.json (every number, device, versions, per-section status), DIR/bench.png
(latency and memory against stream length, log x) and a table on stdout with the ratios and the
real-time targets. Timing: wall clock around each call with the device synchronised before and after
(what a user waits), median / p99 over repeats after warm-up. `__main__` is the command line and the
watchdog.
"""
