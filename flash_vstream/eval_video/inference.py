"""Answer a benchmark's test_qa.json with a Flash-VStream model: the one inference driver.

    python -m flash_vstream.eval_video.inference --model-path P --qa-file test_qa.json \
        --video-dir D --output-file pred.jsonl [--num-chunks N --chunk-idx I] [--batch-size B]

Each QA item `{video_id, question, id, answer, answer_type, duration[, time][, video][, options]}`
is answered from `D/{video_id}.safetensors` (CLIP features at 1 fps), or with `--raw-video` from
the video file (`D/{video}` or `D/{video_id}.<mp4|mkv|...>`) decoded at 1 fps. An item with
`time` sees only the stream up to that second. The prompt is `vicuna_v1` with `<image>\\n{question}`;
decoding is greedy and stops at `</s>`. An item with `options` is answered by option
log-likelihood (`metrics.score_options`) instead, so the model cannot collapse to one letter.

Every item becomes one JSON line, written whole, flushed and fsynced:
  {**the QA item, key, pred, finish_reason, frames, memory_tokens, model, model_base,
   model_config_sha256, generation: {...}, fingerprint}           (+ pred_index for options)
or, when its input is missing or unreadable, the same with `error` instead of `pred`. Such an
item is reported, never answered from another video, and the run goes on; the exit code is 0
unless --fail-on-error.

Resume: a rerun answers only keys without a `pred` line from the same run identity
(`fingerprint` = model path, model base, config hash and generation settings) in the output
file or in --resume-from files. Error lines are retried. A truncated last line (a killed run) is
dropped. Lines of another identity are never mixed in: the old file is moved aside
(--on-mismatch fresh, default) or the run stops with exit code 3 (refuse).

Differences from the published driver, each deliberate:
- greedy decoding (upstream sampled at temperature 0.002 with the checkpoint's top_p 0.6);
- a failed feature load is an error line for that item (upstream answered from a random other
  video);
- one driver for features and raw video, with batching and a cut at the question `time`;
- load_8bit is a flag of its own (upstream passed model_max_length into that slot).
"""

import argparse
import hashlib
import json
import os
import sys

from flash_vstream.conversation import build_prompt
from flash_vstream.eval_video.aggregate import assign_keys
from flash_vstream.utils.files import ResumableJsonl, StaleFile
from flash_vstream.utils.sharding import check_shard, shard

EXIT_ITEM_ERRORS = 2   # --fail-on-error and some items could not be answered
EXIT_REFUSED = 3       # the output holds another run's lines and --on-mismatch refuse


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- QA items

def load_qa(path):
    """The list of QA items of a test_qa.json file, checked for the keys the driver needs."""
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of QA items")
    for n, item in enumerate(items):
        missing = [k for k in ("id", "question", "video_id") if not isinstance(item, dict) or k not in item]
        if missing:
            raise ValueError(f"{path}: item {n} has no {missing}")
    return items


# ---------------------------------------------------------------- run identity

def config_sha256(model_path):
    """Hash of the model's config.json content (key order ignored); None without one."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def generation_settings(args):
    """The settings that decide the answers; part of the run identity."""
    return {
        "conv_mode": args.conv_mode,
        "system": args.system,
        "do_sample": False,
        "num_beams": 1,
        "max_new_tokens": args.max_new_tokens,
        "inputs": "video" if args.raw_video else "features",
        "fps": args.fps if args.raw_video else None,
        "quantization": "8bit" if args.load_8bit else "4bit" if args.load_4bit else None,
        "options": "loglik-mean",  # how items with `options` are answered
        "last_frames": args.last_frames,
    }


def model_identity(model_path, model_base=None):
    """Which model answered: its resolved path, its base and a hash of its config."""
    return {"model": os.path.realpath(model_path),
            "model_base": os.path.realpath(model_base) if model_base else None,
            "model_config_sha256": config_sha256(model_path)}


def fingerprinted(identity):
    """`identity` with its `fingerprint`: a short hash of all its fields, equal exactly for equal run setups."""
    text = json.dumps(identity, sort_keys=True)
    return {**identity, "fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16]}


def run_identity(args):
    """Fields stored on every line; `fingerprint` tells whether two lines come from the same run setup."""
    return fingerprinted({**model_identity(args.model_path, args.model_base), "generation": generation_settings(args)})


# ---------------------------------------------------------------- prediction files

def record_key(rec):
    return str(rec.get("key", rec.get("id")))


def is_answer(rec):
    return isinstance(rec.get("pred"), str) and not rec.get("error")


def _difference(rec, identity):
    """What sets a line's run apart from this one, in words."""
    if "fingerprint" not in rec:
        return "it names no run (not written by this driver)"
    for field in ("model", "model_base", "model_config_sha256"):
        if rec.get(field) != identity[field]:
            return f"{field} {rec.get(field)!r} vs {identity[field]!r} now"
    theirs = rec.get("generation") or {}
    changed = [f"{k} {theirs.get(k)!r} vs {v!r} now" for k, v in identity["generation"].items() if theirs.get(k) != v]
    return "generation " + ", ".join(changed) if changed else "another fingerprint"


def predictions_store(path, identity, on_mismatch="fresh", log=_log):
    """The resumable prediction file of this run identity: a line with `pred` is finished (an
    error line is tried again); a line of another identity (or of no known run) is foreign."""

    def foreign(rec):
        if rec.get("fingerprint") == identity["fingerprint"]:
            return None
        return f"id {rec.get('id')!r}: {_difference(rec, identity)}"

    return ResumableJsonl(path, key=record_key, is_done=is_answer, foreign=foreign,
                          another_run="another model or generation setup", on_mismatch=on_mismatch, log=log)


# ---------------------------------------------------------------- inputs

def find_video(video_dir, item):
    """The raw video file of an item: its `video` path, else `{video_id}` with a video extension."""
    from flash_vstream.video_io import VIDEO_EXTENSIONS, VideoReadError

    if item.get("video"):
        return os.path.join(video_dir, item["video"])
    stem = os.path.join(video_dir, str(item["video_id"]))
    candidates = [stem + ext for ext in VIDEO_EXTENSIONS]
    if stem.lower().endswith(VIDEO_EXTENSIONS):  # a video_id that already names the file
        candidates.insert(0, stem)
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise VideoReadError(f"no video file for video_id {item['video_id']!r} in {video_dir} "
                         f"(tried {', '.join(VIDEO_EXTENSIONS)})")


def cut_at(features, timestamps, end):
    """The frames of `features` (T, 256, D) with timestamp <= `end` seconds (all when end is None)."""
    if end is None:
        return features
    keep = sum(1 for t in timestamps if t <= float(end) + 1e-6)
    if keep == 0:
        raise ValueError(f"no frame at or before time {end}s (first frame at {timestamps[0]}s)")
    return features[:keep]  # (T', 256, D)


class InputLoader:
    """Item -> CLIP features (T, 256, D) on the model's device, from a feature file or a video.

    The last video's features are kept: consecutive questions about one video (the usual order
    of test_qa.json) read it once. The cache is keyed by the resolved file, never by position.
    """

    def __init__(self, model, video_dir, image_processor=None, raw_video=False, fps=1.0, encode_batch=32,
                 last_frames=None):
        if raw_video and image_processor is None:
            raise RuntimeError("--raw-video needs the vision tower (mm_vision_tower could not be loaded)")
        self.model, self.video_dir = model, video_dir
        self.image_processor, self.raw_video, self.fps = image_processor, raw_video, fps
        self.encode_batch = encode_batch
        self.last_frames = last_frames
        self._cache_key, self._cache = None, None

    def __call__(self, item):
        features = self._load(item)  # (T, 256, D), cut at the question time
        if self.last_frames is None:
            return features
        # the memory ablation: the newest K frames repeated to the clip's length, so the memory has
        # its usual size and layout but holds nothing older (K=1: only what is on screen now)
        newest = features[-self.last_frames:]  # (K, 256, D)
        repeats = -(-len(features) // len(newest))
        return newest.repeat(repeats, 1, 1)[-len(features):]  # (T, 256, D)

    def _load(self, item):
        end = item.get("time")
        if self.raw_video:
            path = find_video(self.video_dir, item)
            if (path, end) != self._cache_key:
                self._cache_key, self._cache = None, None
                self._cache = self._encode_video(path, end)  # (T, 256, D) on the model's device
                self._cache_key = (path, end)
            return self._cache
        from flash_vstream.features import FEATURE_EXTENSION, frame_times, load_features_with_meta

        path = os.path.join(self.video_dir, f"{item['video_id']}{FEATURE_EXTENSION}")
        if path != self._cache_key:
            self._cache_key, self._cache = None, None
            feature, meta = load_features_with_meta(path, hidden_size=self.model.config.mm_hidden_size)
            timestamps = frame_times(meta, len(feature), self.model.config.video_fps)
            self._cache, self._cache_key = (feature, timestamps), path
        feature, timestamps = self._cache
        return cut_at(feature, timestamps, end).to(self.model.device)

    def _encode_video(self, path, end):
        import torch

        from flash_vstream.video_io import iter_frames

        chunks, frames = [], []

        def encode():
            chunks.append(self.model.encode_frames(frames, self.image_processor))  # (n, 256, D)
            frames.clear()

        # frames are encoded as they are decoded: an hour of video never sits in memory as pixels
        for frame, _ in iter_frames(path, fps=self.fps, end=None if end is None else float(end)):
            frames.append(frame)
            if len(frames) == self.encode_batch:
                encode()
        if frames:
            encode()
        return torch.cat(chunks)  # (T, 256, D)


# ---------------------------------------------------------------- prompts and answers

def decode_answer(tokenizer, ids, stop="</s>"):
    """(text, finish_reason) of one row of new tokens: cut at the first EOS and at `stop`."""
    ids = [int(t) for t in ids]
    finish = "length"
    if tokenizer.eos_token_id in ids:
        ids, finish = ids[:ids.index(tokenizer.eos_token_id)], "stop"
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if stop and stop in text:
        text, finish = text[:text.index(stop)], "stop"
    return text.strip(), finish


def generate_answers(model, tokenizer, prompts, features, max_new_tokens):
    """Greedy answers [(text, finish_reason)] for a batch of prompts, one (T, 256, D) feature each.

    Rows are left-padded so all of them end at the same column. Generation stops per row at the
    EOS token, which is Vicuna's `</s>` (the conversation's stop string), so no keyword
    criterion has to decode text at every step.
    """
    import torch

    from flash_vstream.mm_utils import tokenizer_image_token

    rows = [tokenizer_image_token(p, tokenizer, return_tensors="pt") for p in prompts]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = r
        attention_mask[i, width - len(r):] = 1
    new_tokens = model.generate(
        input_ids.to(model.device), attention_mask=attention_mask.to(model.device), features=features,
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # (B, <= max_new_tokens)
    return [decode_answer(tokenizer, row) for row in new_tokens]


def choose_option(model, tokenizer, prompt, feature, options):
    """Index of the option whose text the model finds most likely after the prompt."""
    from flash_vstream.eval_video.metrics import score_options
    from flash_vstream.mm_utils import expand_image_tokens, tokenizer_image_token

    memory = model.memory_tokens(features=[feature])[0]  # (N, D)
    prompt_ids = expand_image_tokens(tokenizer_image_token(prompt, tokenizer, return_tensors="pt"), len(memory))
    scorer = lambda ids: model(input_ids=ids, memory=[memory] * len(ids))  # noqa: E731 - one memory per option row
    return score_options(scorer, tokenizer, prompt_ids.to(model.device), [str(o) for o in options], normalize="mean")


# ---------------------------------------------------------------- the run

def answer_items(items, model, tokenizer, load_input, store, identity, args):
    """Answer keyed `items` [(key, qa item)] in batches; append one line each. Returns the error count."""
    from tqdm import tqdm

    from flash_vstream.model.memory import memory_num_tokens
    from flash_vstream.features import FeatureLoadError
    from flash_vstream.video_io import VideoReadError

    input_errors = (FeatureLoadError, VideoReadError, OSError, ValueError)  # this item's input is bad
    errors = 0
    progress = tqdm(total=len(items), desc=f"chunk {args.chunk_idx}/{args.num_chunks}", unit="q", file=sys.stderr,
                    dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10)  # a log file: few updates
    with store.appender() as append:
        for start in range(0, len(items), args.batch_size):
            batch, lines = items[start:start + args.batch_size], {}
            ready = []  # (key, item, features, prompt)
            for key, item in batch:
                base = {**item, "key": key, **identity}
                try:
                    feature = load_input(item)  # (T, 256, D)
                except input_errors as exc:
                    lines[key] = {**base, "error": f"{type(exc).__name__}: {exc}"}
                    continue
                prompt = build_prompt(item["question"], args.conv_mode, item.get("system", args.system),
                                      item.get("options"))
                lines[key] = {**base, "frames": len(feature),
                              "memory_tokens": memory_num_tokens(len(feature), model.config)}
                ready.append((key, item, feature, prompt))
            open_ended = [r for r in ready if not r[1].get("options")]
            if open_ended:
                answers = generate_answers(model, tokenizer, [r[3] for r in open_ended], [r[2] for r in open_ended],
                                           args.max_new_tokens)
                for (key, *_), (text, finish) in zip(open_ended, answers):
                    lines[key].update(pred=text, finish_reason=finish)
            for key, item, feature, prompt in ready:
                if item.get("options"):
                    k = choose_option(model, tokenizer, prompt, feature, item["options"])
                    lines[key].update(pred=str(item["options"][k]), pred_index=k, finish_reason="option")
            for key, _ in batch:  # in QA order
                line = lines[key]
                if "error" in line:
                    errors += 1
                    progress.write(f"item {line['id']!r}: {line['error']}", file=sys.stderr)
                append(line)
            progress.update(len(batch))
    progress.close()
    return errors


def build_parser():
    p = argparse.ArgumentParser(description="Answer a test_qa.json with a Flash-VStream model (JSONL out).",
                                allow_abbrev=False)
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None, help="the LLM under an adapter or LoRA checkpoint")
    p.add_argument("--qa-file", required=True, help="test_qa.json: [{video_id, question, id, answer, ...}]")
    p.add_argument("--video-dir", required=True, help="{video_id}.safetensors features (videos with --raw-video)")
    p.add_argument("--output-file", required=True, help="JSONL answers, appended and resumable")
    p.add_argument("--raw-video", action="store_true", help="decode video files instead of reading features")
    p.add_argument("--fps", type=float, default=1.0, help="frame rate sampled from raw videos")
    p.add_argument("--conv-mode", default="vicuna_v1")
    p.add_argument("--system", default=None, help="replace the template's system message (an item's 'system' wins)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1, help="questions generated together (left-padded)")
    p.add_argument("--num-chunks", type=int, default=1)
    p.add_argument("--chunk-idx", type=int, default=0)
    p.add_argument("--resume-from", nargs="*", default=[],
                   help="other prediction files whose answers of this run identity count as done")
    p.add_argument("--last-frames", type=int, default=None,
                   help="ablation: build the memory from the newest K frames before each question, repeated "
                        "to the clip's length (nothing older reaches the memory)")
    p.add_argument("--limit", type=int, default=None, help="answer at most this many items, then stop")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="default: fp16 on GPU, fp32 on CPU")
    p.add_argument("--load-8bit", action="store_true", help="the LLM's linear layers in int8 (per output channel)")
    p.add_argument("--load-4bit", action="store_true", help="the LLM's linear layers in int4 (groups of 128)")
    p.add_argument("--on-mismatch", choices=("fresh", "refuse"), default="fresh",
                   help="output holds another model's answers: move it aside (fresh) or stop with exit 3")
    p.add_argument("--fail-on-error", action="store_true",
                   help=f"exit {EXIT_ITEM_ERRORS} when some items could not be answered (default: 0, with a summary)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.num_chunks < 1:
        p.error("--batch-size, --max-new-tokens and --num-chunks must be >= 1")
    try:
        check_shard(args.num_chunks, args.chunk_idx)
    except ValueError as e:
        p.error(str(e))
    if args.load_8bit and args.load_4bit:
        p.error("choose one of --load-8bit / --load-4bit")
    return args


def load_model(args):
    import torch

    from flash_vstream.model.builder import load_pretrained_model
    from flash_vstream.runtime.devices import default_device

    device = default_device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, load_8bit=args.load_8bit, load_4bit=args.load_4bit,
        device=device, torch_dtype=dtype)
    if not hasattr(model, "memory_tokens"):
        raise ValueError(f"{args.model_path} is not a Flash-VStream checkpoint (model_type 'vstream')")
    return tokenizer, model, image_processor


def run(args, log=_log):
    """One chunk of one QA file; returns {total, done, answered, errors, output_file}."""
    keyed = shard(assign_keys(load_qa(args.qa_file)), args.num_chunks, args.chunk_idx)
    identity = run_identity(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
    store = predictions_store(args.output_file, identity, args.on_mismatch, log)
    done = set(store.load())
    done |= store.done_keys_in([p for p in args.resume_from if os.path.abspath(p) != os.path.abspath(args.output_file)])
    pending = [(key, item) for key, item in keyed if key not in done]
    summary = {"total": len(keyed), "done": len(keyed) - len(pending), "answered": 0, "errors": 0,
               "output_file": args.output_file}
    if args.limit is not None:
        pending = pending[:args.limit]
    if pending:
        import torch

        torch.manual_seed(0)
        tokenizer, model, image_processor = load_model(args)
        load_input = InputLoader(model, args.video_dir, image_processor, args.raw_video, args.fps,
                                 last_frames=args.last_frames)
        summary["errors"] = answer_items(pending, model, tokenizer, load_input, store, identity, args)
        summary["answered"] = len(pending) - summary["errors"]
    return summary


def main(argv=None):
    args = parse_args(argv)
    try:
        s = run(args)
    except StaleFile as exc:
        _log(str(exc))
        return EXIT_REFUSED
    left = s["total"] - s["done"] - s["answered"] - s["errors"]
    print(f"inference chunk {args.chunk_idx}/{args.num_chunks}: {s['total']} items, {s['done']} already answered, "
          f"{s['answered']} answered now, {s['errors']} error(s)"
          + (f", {left} left for a later run" if left else "") + f" -> {s['output_file']}", flush=True)
    if s["errors"]:
        print(f"{s['errors']} item(s) could not be answered; their lines in {s['output_file']} carry 'error'",
              file=sys.stderr, flush=True)
        if args.fail_on_error:
            return EXIT_ITEM_ERRORS
    return 0


if __name__ == "__main__":
    sys.exit(main())
