"""One benchmark end to end: sharded inference, merge, then scoring.

    python -m flash_vstream.eval_video.run_eval --model-path P --dataset msvd [--gpus 0,1,...] \
        [--judge gpt|exact|mcq|none] [judge flags] [inference flags, e.g. --max-new-tokens 64]

1. Inference: one `python -m flash_vstream.eval_video.inference` process per GPU
   (CUDA_VISIBLE_DEVICES=that GPU) over contiguous chunks of test_qa.json, or N CPU processes
   with --num-chunks N; a single chunk without a GPU list runs in this process. Each process
   appends to OUT/shards/{N}_{I}.jsonl and its output goes to OUT/logs/{N}_{I}.log.
2. Merge: OUT/pred.jsonl gets exactly one line per QA item, in QA order: an answer when any
   shard file (or an earlier pred.jsonl) has one from this run identity, else its error line.
   Lines of another model or generation setup are never merged: before anything runs they are
   moved aside (--on-mismatch fresh) or the run stops with exit code 3 (refuse).
3. Scoring: `exact` (normalised exact match, no API key) -> OUT/exact/, `mcq` -> OUT/mcq/,
   `gpt` (the Video-ChatGPT judge through any OpenAI-compatible server) -> OUT/judge/.

OUT defaults to <model path>/evaluation/<dataset>. A rerun of the same command resumes: only
items without an answer are run again, and the scorers resume too. Flags this launcher does
not know go to every inference process (see `python -m flash_vstream.eval_video.inference -h`).

Exit codes: 0 done; 1 inference or setup failed; 2 some items got no verdict (judge) or, with
--fail-on-error, no answer; 3 another run's lines and --on-mismatch refuse; 4 the dataset's
files are absent and --skip-absent.
"""

import argparse
import glob
import os
import subprocess
import sys
import time

from flash_vstream.eval_video import inference
from flash_vstream.eval_video.aggregate import assign_keys
from flash_vstream.utils.files import StaleFile, read_jsonl, write_jsonl

# --dataset -> (folder under <data root>/eval_video, feature folder, QA file): the published
# code's paths (its README tree shows other names for the VStream sets).
DATASETS = {
    "actnet": ("ActivityNet-QA", "video_features", "test_qa.json"),
    "nextoe": ("nextoe", "video_features", "test_qa.json"),
    "msvd": ("MSVD-QA", "video_features", "test_qa.json"),
    "msrvtt": ("MSRVTT-QA", "video_features", "test_qa.json"),
    "vsmovienet": ("vstream", "movienet_video_features", "test_qa_movienet.json"),
    "vsego4d": ("vstream", "ego4d_video_features", "test_qa_ego4d.json"),
    "realtime_vsmovienet": ("vstream-realtime", "movienet_video_features", "test_qa_movienet.json"),
    "realtime_vsego4d": ("vstream-realtime", "ego4d_video_features", "test_qa_ego4d.json"),
}
DEFAULT_DATA_ROOT = "data"  # as in scripts/train_and_eval.sh: it holds pretrain/, finetune/, eval_video/
SCORER_DIRS = {"exact": "exact", "mcq": "mcq", "gpt": "judge"}
RESERVED = ("--output-file", "--chunk-idx", "--resume-from")  # set per process by the launcher
EXIT_FAILED, EXIT_NO_ANSWER, EXIT_SKIPPED = 1, 2, 4
POLL_S = 1.0


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def dataset_paths(name, data_root):
    """(feature folder, QA file) of a dataset name: <data_root>/eval_video/<folder>/..."""
    folder, features, qa = DATASETS[name]
    root = os.path.join(data_root, "eval_video", folder)
    return os.path.join(root, features), os.path.join(root, qa)


def visible_gpus():
    """GPU ids a child process can be pinned to: CUDA_VISIBLE_DEVICES's entries, else 0..n-1."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


# ---------------------------------------------------------------- merge

def merge_predictions(qa_file, files, fingerprint, pred_file, log=_log):
    """Write `pred_file` with one line per QA key from `files` (earlier files win); returns counts.

    An answer beats an error line; a key without either is left out (the scorers, given the QA
    file, count it as missing). Lines of another run identity are ignored.
    """
    keys = [key for key, _ in assign_keys(inference.load_qa(qa_file))]
    answers, errors, foreign, unknown = {}, {}, 0, set()
    for path in files:
        if not os.path.exists(path):
            continue
        records, _ = read_jsonl(path)
        for r in records:
            if r.get("fingerprint") != fingerprint:
                foreign += 1
                continue
            key = inference.record_key(r)
            (answers if inference.is_answer(r) else errors).setdefault(key, r)
            unknown.add(key)
    unknown -= set(keys)
    if foreign:
        log(f"merge: ignored {foreign} line(s) of another model or generation setup")
    if unknown:
        log(f"merge: ignored {len(unknown)} key(s) that are not in {qa_file}")
    lines = [answers.get(k) or errors.get(k) for k in keys]
    write_jsonl(pred_file, [r for r in lines if r])
    counts = {"total": len(keys), "answered": sum(k in answers for k in keys)}
    counts["errors"] = sum(k in errors and k not in answers for k in keys)
    counts["missing"] = counts["total"] - counts["answered"] - counts["errors"]
    return counts


# ---------------------------------------------------------------- inference processes

def _line_count(paths):
    total = 0
    for path in paths:
        try:
            with open(path, "rb") as f:
                total += f.read().count(b"\n")
        except FileNotFoundError:
            pass
    return total


def _tail(path, n=20):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except FileNotFoundError:
        return ""


def run_processes(argvs, gpus, logs, outputs, total, done):
    """Start one inference process per argv (pinned to gpus[i % len(gpus)] when given), show one
    progress bar over all of them, wait. Returns [(chunk index, exit code)] of failed ones."""
    from tqdm import tqdm

    procs = []
    try:
        for i, (argv, log_path) in enumerate(zip(argvs, logs)):
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            with open(log_path, "a", encoding="utf-8") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "flash_vstream.eval_video.inference", *argv],
                                              stdout=log, stderr=subprocess.STDOUT, env=env))
            where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else "CPU"
            _log(f"chunk {i}/{len(argvs)} on {where}: pid {procs[-1].pid}, log {log_path}")
        start_lines = _line_count(outputs)
        with tqdm(total=total, initial=done, desc="inference", unit="q", file=sys.stderr) as bar:
            while any(p.poll() is None for p in procs):
                time.sleep(POLL_S)
                bar.n = min(total, done + max(0, _line_count(outputs) - start_lines))
                bar.refresh()
    finally:
        for p in procs:  # only on an interrupt: stop the processes this launcher started
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
    return [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]


# ---------------------------------------------------------------- scoring

def score(judge, pred_file, qa_file, output_dir, args):
    """Run the chosen scorer through its CLI entry point; returns its exit code."""
    if judge in ("exact", "mcq"):
        from flash_vstream.eval_video import metrics

        return metrics.main(["--pred-file", pred_file, "--output-dir", output_dir, "--mode", judge,
                             "--qa-file", qa_file])
    from flash_vstream.eval_video import judge as judge_cli

    argv = ["--pred-file", pred_file, "--output-dir", output_dir, "--qa-file", qa_file,
            "--judge-model", args.judge_model, "--num-workers", str(args.judge_workers),
            "--on-mismatch", args.on_mismatch]
    for flag, value in (("--judge-base-url", args.judge_base_url), ("--api-key", args.api_key),
                        ("--azure-endpoint", args.azure_endpoint), ("--api-version", args.api_version),
                        ("--max-retries", args.judge_max_retries), ("--timeout", args.judge_timeout)):
        if value is not None:
            argv += [flag, str(value)]
    return judge_cli.main(argv)  # in process: the API key never shows up in a process list


# ---------------------------------------------------------------- CLI

def build_parser():
    p = argparse.ArgumentParser(
        description="Sharded inference + merge + scoring for one video QA benchmark.", allow_abbrev=False,
        epilog="Other flags (--model-path, --max-new-tokens, --batch-size, --raw-video, --device, ...) go to "
               "every inference process: python -m flash_vstream.eval_video.inference -h")
    p.add_argument("--dataset", choices=tuple(DATASETS), help="a benchmark under --data-root")
    p.add_argument("--data-root", default=os.environ.get("DATA_ROOT", DEFAULT_DATA_ROOT),
                   help="data folder holding eval_video/ (env DATA_ROOT; default data)")
    p.add_argument("--qa-file", default=None, help="test_qa.json (default: the dataset's)")
    p.add_argument("--video-dir", default=None, help="feature (or --raw-video) folder (default: the dataset's)")
    p.add_argument("--output-dir", default=None, help="default: <model path>/evaluation/<dataset>")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids, one process each (default: all visible)")
    p.add_argument("--num-chunks", type=int, default=None,
                   help="inference processes (default: one per GPU; 1 on CPU)")
    p.add_argument("--skip-absent", action="store_true",
                   help=f"exit {EXIT_SKIPPED} with a message when the dataset's files are absent")
    p.add_argument("--on-mismatch", choices=("fresh", "refuse"), default="fresh",
                   help="OUT holds another run's predictions: move them aside (fresh) or stop with exit 3")
    p.add_argument("--fail-on-error", action="store_true",
                   help=f"exit {EXIT_NO_ANSWER} when some items could not be answered")
    p.add_argument("--judge", choices=("gpt", "exact", "mcq", "none"), default="gpt",
                   help="gpt: Video-ChatGPT judge; exact: normalised exact match; mcq: option accuracy")
    p.add_argument("--judge-model", default="gpt-3.5-turbo-0125")
    p.add_argument("--judge-base-url", default=None, help="any OpenAI-compatible server (default: OPENAI_BASE_URL)")
    p.add_argument("--api-key", default=None, help="default: OPENAI_API_KEY")
    p.add_argument("--azure-endpoint", default=None)
    p.add_argument("--api-version", default=None)
    p.add_argument("--judge-workers", type=int, default=8, help="concurrent judge requests")
    p.add_argument("--judge-max-retries", type=int, default=None)
    p.add_argument("--judge-timeout", type=float, default=None)
    return p


def run_inference(base_argv, qa_file, out, identity, gpus, num_chunks, in_process):
    """Inference over `num_chunks` shards into OUT/shards, resuming from what OUT already holds.

    Returns (the prediction files to merge, this run's shards first; [(chunk, exit code)] of failures)."""
    shard_dir, log_dir = os.path.join(out, "shards"), os.path.join(out, "logs")
    os.makedirs(shard_dir, exist_ok=True)
    outputs = [os.path.join(shard_dir, f"{num_chunks}_{i}.jsonl") for i in range(num_chunks)]
    earlier = [f for f in [os.path.join(out, "pred.jsonl")] + sorted(glob.glob(os.path.join(shard_dir, "*.jsonl")))
               if os.path.exists(f)]
    argvs = [base_argv + ["--output-file", outputs[i], "--num-chunks", str(num_chunks), "--chunk-idx", str(i),
                          "--resume-from", *[f for f in earlier if f != outputs[i]]] for i in range(num_chunks)]
    files = outputs + [f for f in earlier if f not in outputs]
    if in_process:
        rc = inference.main(argvs[0])
        return files, [(0, rc)] if rc != 0 else []
    os.makedirs(log_dir, exist_ok=True)
    logs = [os.path.join(log_dir, f"{num_chunks}_{i}.log") for i in range(num_chunks)]
    total = len(inference.load_qa(qa_file))
    done = len(inference.predictions_store(os.path.join(out, "pred.jsonl"), identity).done_keys_in(earlier))
    failed = run_processes(argvs, gpus, logs, outputs, total, min(done, total))
    for i, rc in failed:
        _log(f"chunk {i} exited with code {rc}; last lines of {logs[i]}:\n{_tail(logs[i])}")
    return files, failed


def main(argv=None):
    p = build_parser()
    args, rest = p.parse_known_args(argv)
    if args.dataset is None and not (args.qa_file and args.video_dir and args.output_dir):
        p.error("give --dataset, or --qa-file, --video-dir and --output-dir")
    bad = [a for a in rest if a.split("=")[0] in RESERVED]
    if bad:
        p.error(f"{bad[0]} is set by the launcher for each process")
    video_dir, qa_file = dataset_paths(args.dataset, args.data_root) if args.dataset else (None, None)
    video_dir, qa_file = args.video_dir or video_dir, args.qa_file or qa_file
    absent = [path for path in (qa_file, video_dir) if not os.path.exists(path)]
    if absent:
        _log(f"{'skip' if args.skip_absent else 'error'}: {args.dataset or qa_file}: {absent[0]} not found")
        return EXIT_SKIPPED if args.skip_absent else EXIT_FAILED

    base = rest + ["--qa-file", qa_file, "--video-dir", video_dir, "--on-mismatch", args.on_mismatch]
    probe = inference.parse_args(base + ["--output-file", os.devnull])  # validates the passed-through flags
    identity = inference.run_identity(probe)
    out = args.output_dir or os.path.join(probe.model_path, "evaluation", args.dataset)
    pred_file = os.path.join(out, "pred.jsonl")
    if probe.device and probe.device.startswith("cpu"):
        gpus = []
    else:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else visible_gpus()
    num_chunks = args.num_chunks or max(1, len(gpus))

    try:  # before anything runs: no line of another run may be resumed from or merged
        for path in [pred_file] + sorted(glob.glob(os.path.join(out, "shards", "*.jsonl"))):
            inference.predictions_store(path, identity, args.on_mismatch).check()
    except StaleFile as exc:
        _log(str(exc))
        return inference.EXIT_REFUSED
    _log(f"{args.dataset or qa_file}: model {identity['model']} (fingerprint {identity['fingerprint']}), "
         f"{num_chunks} chunk(s) on {'GPUs ' + ','.join(gpus) if gpus else 'CPU'} -> {out}")
    # one chunk without an explicit GPU list needs no pinning: it runs here, without a second start-up
    files, failed = run_inference(base, qa_file, out, identity, gpus, num_chunks,
                                  in_process=num_chunks == 1 and not args.gpus)

    counts = merge_predictions(qa_file, files, identity["fingerprint"], pred_file)
    _log(f"predictions: {counts['answered']}/{counts['total']} answered, {counts['errors']} error(s), "
         f"{counts['missing']} missing -> {pred_file}")
    if failed:
        _log(f"inference failed for chunk(s) {[i for i, _ in failed]}; rerun the same command to resume")
        return EXIT_FAILED
    rc = 0
    if args.judge != "none":
        rc = score(args.judge, pred_file, qa_file, os.path.join(out, SCORER_DIRS[args.judge]), args)
    if rc == 0 and args.fail_on_error and counts["errors"] + counts["missing"]:
        return EXIT_NO_ANSWER
    return rc

if __name__ == "__main__":
    sys.exit(main())
