"""The embedded demo: the real pipeline, end to end, on streams it generates itself.

    python -m flash_vstream.demo.run_demo --output demo_output [--device cpu|cuda] [--preset cpu|gpu|quick]

generate synthetic streams -> tiny CLIP + tokenizer + LLM checkpoints -> extract features ->
stage 1 (projector + Semantic Attention) -> stage 2 (everything but the vision tower) ->
held-out evaluation with exact match (full memory, spatial-only ablation, majority baseline) ->
the realtime CLI in scripted mode on one held-out stream (answers + memory timeline PNG) ->
a table per question family. Every step writes into the output folder and is skipped when its
output is already there, so a rerun reuses finished steps.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from . import synthetic
from .tiny import build_tiny_clip, build_tiny_llama, train_tokenizer

SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class Preset:
    train_streams: int
    test_streams: int
    stream_length: tuple
    train_questions: int
    test_questions: int
    clip_hidden: int
    llm_hidden: int
    llm_layers: int
    stage1_epochs: float
    stage2_epochs: float
    batch_size: int
    stage1_lr: float
    stage2_lr: float


PRESETS = {
    # the default: the whole demo on a laptop-class CPU
    "cpu": Preset(train_streams=400, test_streams=40, stream_length=(40, 80), train_questions=10, test_questions=10,
                  clip_hidden=32, llm_hidden=128, llm_layers=4, stage1_epochs=1, stage2_epochs=3, batch_size=16,
                  stage1_lr=1e-3, stage2_lr=2e-3),
    # seconds: what the test suite runs to guard the chain
    "quick": Preset(train_streams=6, test_streams=2, stream_length=(30, 36), train_questions=4, test_questions=5,
                    clip_hidden=32, llm_hidden=32, llm_layers=1, stage1_epochs=1, stage2_epochs=1, batch_size=8,
                    stage1_lr=1e-3, stage2_lr=1e-3),
    # DEMO_DEVICE=cuda: more streams and a wider model
    "gpu": Preset(train_streams=800, test_streams=100, stream_length=(60, 240), train_questions=10, test_questions=5,
                  clip_hidden=64, llm_hidden=256, llm_layers=6, stage1_epochs=1, stage2_epochs=4, batch_size=32,
                  stage1_lr=1e-3, stage2_lr=5e-4),
}

# The demo's memory: the released layout at a size a tiny model learns in minutes (tokens per
# frame 16/4/1, 16 temporal and abstract slots, 2 retrieved frames: 128 tokens in all).
DEMO_MEMORY = dict(compress_size=4, compress_long_memory_size=2, compress_Turing_memory_size=1,
                   video_current_memory_length=1, video_long_memory_length=16, video_Turing_memory_length=16,
                   video_retrieved_memory_length=2, video_buffer_length=300)


def log(message):
    print(f"[demo] {message}", flush=True)


class Steps:
    """Runs each step once: a step whose marker file exists is reported and skipped."""

    def __init__(self):
        self.timings = []

    def run(self, name, marker, action):
        if marker is not None and os.path.exists(marker):
            log(f"{name}: done already ({marker})")
            return
        log(f"{name} ...")
        started = time.time()
        action()
        self.timings.append((name, time.time() - started))
        log(f"{name}: {time.time() - started:.0f} s")


def build_models(preset, paths, seed):
    build_tiny_clip(paths["clip"], hidden_size=preset.clip_hidden, seed=seed)
    with open(paths["corpus"]) as f:
        texts = f.read().splitlines()
    train_tokenizer(texts + [SYSTEM_PROMPT, "USER: ASSISTANT:"], paths["tokenizer"], vocab_size=300)
    build_tiny_llama(paths["llm"], paths["tokenizer"], hidden_size=preset.llm_hidden, num_layers=preset.llm_layers,
                     num_heads=4, seed=seed)


def extract(paths, device):
    from ..extract_features import extract_paths

    videos = []
    for split in synthetic.SPLITS:
        folder = os.path.join(paths["data"], "videos", split)
        videos += sorted(os.path.join("videos", split, name) for name in os.listdir(folder) if name.endswith(".mp4"))
    report = extract_paths(videos, paths["data"], paths["features"], paths["clip"], device=device, dtype="fp32",
                           batch_size=128)
    if report["failed"]:
        raise RuntimeError(f"feature extraction failed for {report['failed'][:3]}")


def train_stage(preset, paths, device, stage):
    from ..train.train import train

    memory = [f"--{key}={value}" for key, value in DEMO_MEMORY.items()]
    common = ["--model_name_or_path", paths["llm"], "--vision_tower", paths["clip"], "--use_features", "True",
              "--video_folder", paths["features"], "--per_device_train_batch_size", str(preset.batch_size),
              "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.03", "--weight_decay", "0",
              "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
              "--dataloader_num_workers", "1", "--group_by_modality_length", "True", "--memory_mode", "paper",
              "--model_max_length", "1024"] + memory
    if device == "cpu":
        common += ["--use_cpu", "True"]
    else:
        common += ["--bf16", "True"]
    if stage == 1:
        argv = ["--version", "plain", "--tune_mm_mlp_adapter", "True", "--data_path", paths["pretrain_json"],
                "--learning_rate", str(preset.stage1_lr), "--num_train_epochs", str(preset.stage1_epochs),
                "--output_dir", paths["stage1"]]
    else:
        argv = ["--version", "v1", "--pretrain_mm_mlp_adapter", os.path.join(paths["stage1"], "mm_projector.bin"),
                "--data_path", paths["finetune_json"], "--learning_rate", str(preset.stage2_lr),
                "--num_train_epochs", str(preset.stage2_epochs), "--output_dir", paths["stage2"]]
    train(common + argv)


def evaluate(paths, device, name, extra=(), out=None):
    """Answers the held-out set with the stage-2 model (inference flags `extra`) and scores it by exact match
    into `out` (default: the demo's eval/<name>); returns `out`: pred.jsonl and exact/results.json."""
    from ..eval_video import inference, metrics

    out = out or os.path.join(paths["eval"], name)
    argv = ["--model-path", paths["stage2"], "--qa-file", paths["test_qa"],
            "--video-dir", os.path.join(paths["features"], "videos", "test"),
            "--output-file", os.path.join(out, "pred.jsonl"), "--max-new-tokens", "6", "--batch-size", "20",
            "--device", device, *extra]
    if inference.main(argv) != 0:
        raise RuntimeError(f"inference for {name} failed")
    metrics.evaluate(os.path.join(out, "pred.jsonl"), os.path.join(out, "exact"), mode="exact",
                     qa_file=paths["test_qa"])
    return out


def majority_baseline(paths):
    """Per family, the most frequent training answer, scored on the held-out questions."""
    from ..eval_video.metrics import exact_match

    with open(paths["finetune_json"]) as f:
        train_records = json.load(f)
    counts = collections.defaultdict(collections.Counter)
    for record in train_records:
        counts[record["answer_type"]][record["conversations"][-1]["value"]] += 1
    with open(paths["test_qa"]) as f:
        test = json.load(f)
    result = collections.defaultdict(list)
    for item in test:
        guess = counts[item["answer_type"]].most_common(1)[0][0]
        ok = bool(exact_match(guess, item["answer"]))
        result[item["answer_type"]].append(ok)
        result["all"].append(ok)
    return {family: 100.0 * sum(v) / len(v) for family, v in result.items()}


def accuracy_by_family(results_dir):
    with open(os.path.join(results_dir, "exact", "results.json")) as f:
        results = json.load(f)
    table = {"all": 100.0 * results["accuracy"]}
    for family, row in results["by_type"].items():
        table[family] = 100.0 * row["accuracy"]
    return table


def accuracy_on_backgrounds(results_dir, test_qa):
    """Per family, exact match over the questions about a background colour only: the tiny random CLIP's
    pooled features keep a scene's background far better than a small shape's colour."""
    with open(test_qa) as f:
        about_background = {q["id"] for q in json.load(f) if "background" in q["question"]}
    hits = collections.defaultdict(list)
    with open(os.path.join(results_dir, "exact", "exact.jsonl")) as f:
        for line in f:
            item = json.loads(line)
            if item["id"] in about_background:
                hits[item["answer_type"]].append(item["verdict"] == "yes")
                hits["all"].append(item["verdict"] == "yes")
    return {family: 100.0 * sum(v) / len(v) for family, v in hits.items()}


def machine():
    """Where the run happened (the README quotes it beside the table)."""
    import platform

    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def realtime(paths, device):
    """The realtime CLI, scripted, on the first held-out stream: questions at their stream times."""
    with open(paths["test_qa"]) as f:
        test = json.load(f)
    stream = test[0]["video_id"]
    questions = sorted((q for q in test if q["video_id"] == stream), key=lambda q: q["time"])
    qfile = os.path.join(paths["realtime"], "questions.jsonl")
    os.makedirs(paths["realtime"], exist_ok=True)
    with open(qfile, "w") as f:
        for q in questions:
            f.write(json.dumps({"time": q["time"], "question": q["question"]}) + "\n")
    answers = os.path.join(paths["realtime"], "answers.jsonl")
    cmd = [sys.executable, "-m", "flash_vstream.serve.cli_video_stream", "--model-path", paths["stage2"],
           "--video-file", os.path.join(paths["data"], questions[0]["video"]), "--questions", qfile,
           "--output", answers, "--play_speed", "50", "--device", device, "--max-new-tokens", "6",
           "--temperature", "0", "--log-file", os.path.join(paths["realtime"], "realtime.log"),
           "--memory-plot", paths["memory_plot"]]
    subprocess.run(cmd, check=True)
    with open(answers) as f:
        lines = [json.loads(line) for line in f]
    expected = {q["question"]: q["answer"] for q in questions}
    log(f"realtime CLI on {stream} (answers from the live memory at each question time):")
    for line in lines:
        log(f"  t={line['time']:>5}s  frames={line['frames_seen']:>3}  tokens={line['memory_tokens']:>3}  "
            f"{line['question']!r} -> {line['answer']!r} (expected {expected.get(line['question'])!r})")


def format_table(rows, families):
    header = f"| {'question family':<16} | " + " | ".join(f"{name:>18}" for name in rows) + " |"
    lines = [header, "|" + "-" * 18 + "|" + "|".join("-" * 19 + ":" for _ in rows) + "|"]
    for family in families:
        cells = " | ".join(f"{rows[name].get(family, float('nan')):>17.1f}%" for name in rows)
        lines.append(f"| {family:<16} | {cells} |")
    return "\n".join(lines)


def demo_paths(output):
    data = os.path.join(output, "data")
    return {
        "data": data, "features": os.path.join(data, "video_features"),
        "corpus": os.path.join(data, "corpus.txt"), "test_qa": os.path.join(data, "test_qa.json"),
        "pretrain_json": os.path.join(data, "pretrain.json"), "finetune_json": os.path.join(data, "finetune.json"),
        "clip": os.path.join(output, "ckpt", "clip-tiny"), "tokenizer": os.path.join(output, "ckpt", "tokenizer"),
        "llm": os.path.join(output, "ckpt", "llm-tiny"),
        "stage1": os.path.join(output, "checkpoints-pretrain", "vstream-tiny-pretrain"),
        "stage2": os.path.join(output, "checkpoints-finetune", "vstream-tiny-finetune"),
        "eval": os.path.join(output, "evaluation"), "realtime": os.path.join(output, "realtime"),
        "memory_plot": os.path.join(output, "realtime", "memory_timeline.png"),
        "results": os.path.join(output, "results.json"),
    }


def run(output, device="cpu", preset_name="cpu", seed=0):
    preset = PRESETS[preset_name]
    paths = demo_paths(output)
    steps = Steps()
    started = time.time()
    steps.run("generate synthetic streams", os.path.join(paths["data"], "meta.json"), lambda: synthetic.generate_dataset(
        paths["data"], num_train_streams=preset.train_streams, num_test_streams=preset.test_streams,
        stream_length=preset.stream_length, seed=seed, train_questions_per_stream=preset.train_questions,
        test_questions_per_stream=preset.test_questions, workers=2))
    steps.run("build tiny CLIP, tokenizer and LLM", os.path.join(paths["llm"], "config.json"),
              lambda: build_models(preset, paths, seed))
    steps.run("extract CLIP features", None, lambda: extract(paths, device))
    steps.run("stage 1: align projector + Semantic Attention", os.path.join(paths["stage1"], "mm_projector.bin"),
              lambda: train_stage(preset, paths, device, 1))
    steps.run("stage 2: instruction tuning", os.path.join(paths["stage2"], "model.safetensors"),
              lambda: train_stage(preset, paths, device, 2))
    full, ablation = os.path.join(paths["eval"], "full"), os.path.join(paths["eval"], "spatial_only")
    steps.run("evaluate: full STAR memory", os.path.join(full, "exact", "results.json"),
              lambda: evaluate(paths, device, "full"))
    steps.run("evaluate: spatial-only ablation (memory filled with the newest frame)", os.path.join(ablation, "exact", "results.json"),
              lambda: evaluate(paths, device, "spatial_only", ["--last-frames", "1"]))
    steps.run("realtime CLI on a held-out stream", paths["memory_plot"], lambda: realtime(paths, device))

    rows = {"Flash-VStream (tiny)": accuracy_by_family(full),
            "spatial-only": accuracy_by_family(ablation),
            "majority answer": majority_baseline(paths)}
    families = ["all"] + [f for f in synthetic.FAMILIES if f in rows["Flash-VStream (tiny)"]]
    table = format_table(rows, families)
    with open(paths["results"], "w") as f:
        json.dump({"accuracy": rows,
                   "accuracy_background_questions": {
                       "Flash-VStream (tiny)": accuracy_on_backgrounds(full, paths["test_qa"]),
                       "spatial-only": accuracy_on_backgrounds(ablation, paths["test_qa"])},
                   "preset": preset_name, "device": device, "machine": machine(),
                   "seconds": {name: round(s, 1) for name, s in steps.timings},
                   "total_seconds": round(time.time() - started, 1)}, f, indent=2)
    print("\nHeld-out accuracy (exact match) by question family:\n" + table, flush=True)
    log(f"memory timeline: {paths['memory_plot']}; results: {paths['results']}; "
        f"total {time.time() - started:.0f} s")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output")
    parser.add_argument("--device", default=os.environ.get("DEMO_DEVICE", "cpu"), choices=("cpu", "cuda"))
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="default: cpu on the CPU, gpu with --device cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    preset = args.preset or ("gpu" if args.device == "cuda" else "cpu")
    run(args.output, args.device, preset, args.seed)


if __name__ == "__main__":
    main()
