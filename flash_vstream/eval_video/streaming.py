"""Streaming benchmarks answered from the live memory: StreamingBench, OVO-Bench, VStream-QA real-time and
multiple-choice files (EgoSchema / MLVU / Video-MME style).

    python -m flash_vstream.eval_video.streaming --benchmark streamingbench|ovobench|vstream|mcq \
        --anno FILE --video-dir DIR --model-path P --output-dir OUT [--protocol stream|clip] [--context-s 60] \
        [--num-chunks N --chunk-idx I]
    python -m flash_vstream.eval_video.streaming --score --benchmark B --anno FILE --pred-file PRED [...] \
        --output-dir OUT

`stream` (default) plays each video once through a `StreamSession` and answers every question from the
memory at its time (OVO-Bench forward tasks: at each test point); `clip` is the benchmarks' offline
protocol, a fresh memory per question built from the clip [0 or time - context_s, time].

Predictions: OUT/predictions.jsonl (a chunk: OUT/predictions_{N}_{I}.jsonl, videos split into contiguous
chunks), one line per question asked: the benchmark's identifiers (`video` as the annotation names it,
`question`, `time` s, OVO-Bench `id` / `task` / `test_index`, StreamingBench `task_type`), `gt`, the reply
as `answer`, `loglik_index` / `loglik_option` for questions with choices, `stream_time`, `frames_seen`,
`memory_tokens`, and the run identity; or `error` when the video could not be read. A rerun resumes:
only questions without an answer of the same run identity are asked, and a video is played only when
one of its questions is left (up to the last such question). Lines of another run are moved aside.

Scoring (a single chunk scores at the end; --score scores any prediction files): OUT/results.json with
per-task, per-category (OVO-Bench) and total scores in the benchmark's names, the judge-free
log-likelihood column, the protocol, the model and the annotation problems; OUT/results.csv,
OUT/verdicts.jsonl, and for VStream-QA OUT/judge_input.jsonl for `flash_vstream.eval_video.judge`.

Differences from the published adapters: the video reaches the model (their prompts dropped `<image>`),
and a video is streamed once instead of cut into a clip per question (kept as --protocol clip).
"""

import argparse
import json
import os
import sys

from flash_vstream.eval_video.streaming_bench.loaders import (BENCHMARKS, AnnotationProblem, group_by_video,
                                                              load_annotations)
from flash_vstream.eval_video.streaming_bench.scoring import load_prediction_files, score, write_report
from flash_vstream.utils.files import ResumableJsonl, StaleFile
from flash_vstream.utils.sharding import check_shard, shard

EXIT_BAD_ANNOTATION, EXIT_REFUSED = 2, 3


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def build_parser():
    p = argparse.ArgumentParser(description="Streaming video benchmarks answered from the live memory.",
                                allow_abbrev=False)
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--anno", required=True, help="the benchmark's annotation file (official format)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--score", action="store_true", help="only score --pred-file against --anno")
    p.add_argument("--pred-file", nargs="+", default=None, help="--score: prediction JSONL file(s) (shards)")
    p.add_argument("--video-dir", default=None, help="videos (or {stem}.safetensors features) as the annotation names them")
    p.add_argument("--model-path", default=None)
    p.add_argument("--model-base", default=None)
    p.add_argument("--protocol", choices=("stream", "clip"), default="stream")
    p.add_argument("--context-s", type=float, default=None,
                   help="clip protocol: the clip starts this many seconds before the question (default: at 0)")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--conv-mode", default="vicuna_v1")
    p.add_argument("--no-loglik", action="store_true", help="skip the option log-likelihood column")
    p.add_argument("--encode-batch", type=int, default=16, help="frames encoded together")
    p.add_argument("--num-chunks", type=int, default=1)
    p.add_argument("--chunk-idx", type=int, default=0)
    p.add_argument("--limit-videos", type=int, default=None, help="play at most this many videos, then stop")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None)
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--load-4bit", action="store_true")
    p.add_argument("--fast", choices=("auto", "on", "off"), default="auto", help="the session's fast path")
    p.add_argument("--on-mismatch", choices=("fresh", "refuse"), default="fresh",
                   help="the output holds another run's lines: move it aside (fresh) or stop with exit 3")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.score:
        if not args.pred_file:
            p.error("--score needs --pred-file")
    else:
        if not (args.video_dir and args.model_path):
            p.error("inference needs --video-dir and --model-path (or pass --score)")
        try:
            check_shard(args.num_chunks, args.chunk_idx)
        except ValueError as e:
            p.error(str(e))
        if args.context_s is not None and args.protocol != "clip":
            p.error("--context-s belongs to --protocol clip")
    return args


def run_identity(args):
    from flash_vstream.eval_video.inference import fingerprinted, model_identity

    return fingerprinted({
        **model_identity(args.model_path, args.model_base),
        "benchmark": args.benchmark, "protocol": args.protocol, "context_s": args.context_s,
        "settings": {"fps": args.fps, "max_new_tokens": args.max_new_tokens, "conv_mode": args.conv_mode,
                     "loglik": not args.no_loglik, "decoding": "greedy"},
    })


def prediction_file(args):
    name = "predictions.jsonl" if args.num_chunks == 1 else f"predictions_{args.num_chunks}_{args.chunk_idx}.jsonl"
    return os.path.join(args.output_dir, name)


def _store(path, identity, on_mismatch):
    def foreign(rec):
        if rec.get("fingerprint") == identity["fingerprint"]:
            return None
        return f"key {rec.get('key')!r}: model {rec.get('model')!r}, protocol {rec.get('protocol')!r}"

    return ResumableJsonl(path, key=lambda r: str(r.get("key")),
                          is_done=lambda r: isinstance(r.get("answer"), str) and not r.get("error"),
                          foreign=foreign, another_run="another model, benchmark or protocol",
                          on_mismatch=on_mismatch, log=_log)


def infer(args, queries):
    """Answer this chunk's pending questions; returns {videos, asked, errors, pred_file}."""
    identity = run_identity(args)
    os.makedirs(args.output_dir, exist_ok=True)
    path = prediction_file(args)
    store = _store(path, identity, args.on_mismatch)
    done = set(store.load())
    videos = shard(group_by_video(queries), args.num_chunks, args.chunk_idx)
    todo = [(v, [q for q in qs if q["key"] not in done]) for v, qs in videos]
    todo = [(v, qs) for v, qs in todo if qs][:args.limit_videos]
    summary = {"videos": len(todo), "asked": 0, "errors": 0, "pred_file": path}
    if not todo:
        return summary
    import torch

    from flash_vstream.eval_video.inference import load_model
    from flash_vstream.eval_video.streaming_bench.protocol import Player

    torch.manual_seed(0)
    tokenizer, model, image_processor = load_model(args)
    player = Player(model, tokenizer, image_processor, args.video_dir, fps=args.fps,
                    max_new_tokens=args.max_new_tokens, conv_mode=args.conv_mode, encode_batch=args.encode_batch,
                    loglik=not args.no_loglik, fast={"auto": None, "on": True, "off": False}[args.fast])
    extra = {"protocol": args.protocol, "context_s": args.context_s, **identity}
    with store.appender() as append:
        def on_record(rec):
            summary["asked"] += 1
            summary["errors"] += bool(rec.get("error"))
            append({**rec, **extra})

        for n, (video, qs) in enumerate(todo):
            _log(f"[{n + 1}/{len(todo)}] {video}: {len(qs)} question(s), protocol {args.protocol}")
            if args.protocol == "stream":
                player.play(video, qs, on_record)
            else:
                for q in qs:
                    on_record(player.clip(q, args.context_s))
    return summary


def score_files(args, queries, problems, pred_files):
    preds = load_prediction_files(pred_files, log=_log)
    result, verdicts = score(args.benchmark, queries, preds)
    runs = [p for p in preds.values() if p.get("fingerprint")]
    result.update({
        "protocol": _one_value(runs, "protocol"), "context_s": _one_value(runs, "context_s"),
        "model": _one_value(runs, "model"), "anno_file": os.path.abspath(args.anno),
        "pred_files": [os.path.abspath(p) for p in pred_files],
        "annotation_problems": problems,
    })
    write_report(result, verdicts, queries, preds, args.output_dir)
    return result


def _one_value(records, field):
    values = sorted({json.dumps(r.get(field)) for r in records})
    return json.loads(values[0]) if len(values) == 1 else [json.loads(v) for v in values] or None


def main(argv=None):
    args = parse_args(argv)
    try:
        queries, problems = load_annotations(args.benchmark, args.anno)
    except (AnnotationProblem, OSError) as exc:
        _log(str(exc))
        return EXIT_BAD_ANNOTATION
    for line in problems:
        _log(f"annotation problem: {line}")
    _log(f"{args.anno}: {len(queries)} question(s) over {len(group_by_video(queries))} video(s)"
         + (f"; {len(problems)} item(s) unusable (listed in results.json)" if problems else ""))
    if args.score:
        score_files(args, queries, problems, args.pred_file)
        return 0
    try:
        s = infer(args, queries)
    except StaleFile as exc:
        _log(str(exc))
        return EXIT_REFUSED
    print(f"{args.benchmark} chunk {args.chunk_idx}/{args.num_chunks}: {s['videos']} video(s) played, "
          f"{s['asked']} question(s) answered now, {s['errors']} error line(s) -> {s['pred_file']}", flush=True)
    if args.num_chunks == 1:
        score_files(args, queries, problems, [s["pred_file"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
