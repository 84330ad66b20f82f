"""Training throughput on a GPU (a benchmark, not a test): stage 1 and stage 2 for a few dozen steps.

Builds a LLaMA of a chosen shape (default ~1.1B: hidden 2048, 22 layers) and a CLIP-L/14-shaped
vision tower with random weights, writes random CLIP features and LLaVA-format records, then runs
the real training entry (`flash_vstream.train.train_mem`) through DeepSpeed for each stage and
reports samples/s, tokens/s, peak GPU memory and model-FLOPs utilisation (6 x params x tokens,
recomputation not counted) per GPU, plus what a 7B epoch would take at the measured rate.

    python scripts/bench_train.py --output-dir OUT [--steps 30] [--zero2 scripts/zero2.json] [--zero3 scripts/zero3.json]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_BF16_DENSE_FLOPS = 989e12


def build_inputs(root, args):
    import torch
    from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from flash_vstream.demo.tiny import TINY_CORPUS, train_tokenizer
    from flash_vstream.video_io import save_features

    torch.manual_seed(0)
    with torch.device(args.device):
        clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                                num_hidden_layers=args.clip_layers, num_attention_heads=16,
                                                image_size=224, patch_size=14))
    clip.to(torch.bfloat16).save_pretrained(f"{root}/clip")
    from transformers import CLIPImageProcessor
    CLIPImageProcessor().save_pretrained(f"{root}/clip")
    del clip
    train_tokenizer(TINY_CORPUS * 50, f"{root}/llm", vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(f"{root}/llm")
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(args.device):
        llm = LlamaForCausalLM(config).to(torch.bfloat16)
    llm.save_pretrained(f"{root}/llm")
    n_params = sum(p.numel() for p in llm.parameters())
    del llm
    os.makedirs(f"{root}/features", exist_ok=True)
    records = []
    words = " ".join(TINY_CORPUS).split()
    for i in range(args.videos):
        save_features(f"{root}/features/v{i}.safetensors",
                      torch.randn(args.frames, 256, 1024, dtype=torch.float16), {"fps": 1})
    for i in range(args.records):
        answer = " ".join(words[(i * 7 + k) % len(words)] for k in range(args.answer_words))
        records.append({"id": f"r{i}", "video": f"v{i % args.videos}.mp4", "conversations": [
            {"from": "human", "value": "<image>\ndescribe what happens in the video in detail."},
            {"from": "gpt", "value": answer}]})
    with open(f"{root}/data.json", "w") as f:
        json.dump(records, f)
    text_tokens = len(tokenizer("<image>\ndescribe what happens in the video in detail. " + answer).input_ids)
    return n_params, text_tokens


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(root, stage, zero, args):
    out = f"{root}/stage{stage}"
    argv = ["--model_name_or_path", f"{root}/llm", "--vision_tower", f"{root}/clip", "--use_features", "True",
            "--video_folder", f"{root}/features", "--data_path", f"{root}/data.json", "--output_dir", out,
            *(["--bf16", "True"] if args.device == "cuda" else ["--use_cpu", "True"]),
            "--gradient_checkpointing", "True", "--deepspeed", zero, "--max_steps", str(args.steps),
            "--per_device_train_batch_size", str(args.batch), "--learning_rate", "1e-3" if stage == 1 else "2e-5",
            "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.03", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "4",
            "--model_max_length", "2048", "--version", "plain" if stage == 1 else "v1"]
    if stage == 1:
        argv += ["--tune_mm_mlp_adapter", "True"]
    else:
        argv += ["--pretrain_mm_mlp_adapter", f"{root}/stage1/mm_projector.bin"]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=REPO)
    metrics_file = f"{root}/metrics{stage}.json"
    code = ("import json, sys, time, torch; from flash_vstream.train.train import train; t = time.time(); "
            "tr = train(sys.argv[1:]); "
            f"peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0; "
            f"json.dump({{'log': tr.state.log_history, 'peak_bytes': peak, "
            f"'trainable': sum(getattr(p, 'ds_numel', p.numel()) for p in tr.model.parameters() if p.requires_grad), "
            f"'seconds': time.time() - t}}, open('{metrics_file}', 'w'))")
    started = time.time()
    result = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    if result.returncode:
        return {"stage": stage, "zero": os.path.basename(zero), "error": result.stderr[-3000:]}
    with open(metrics_file) as f:
        metrics = json.load(f)
    steps = [h for h in metrics["log"] if "loss" in h]
    summary = [h for h in metrics["log"] if "train_runtime" in h][-1]
    return {"stage": stage, "zero": os.path.basename(zero), "wall_s": round(time.time() - started, 1),
            "steps": len(steps), "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
            "samples_per_s": summary["train_samples_per_second"], "peak_gib": metrics["peak_bytes"] / 2**30,
            "trainable_params": metrics["trainable"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--answer-words", type=int, default=60)
    parser.add_argument("--clip-layers", type=int, default=24)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run only")
    parser.add_argument("--zero-stage1", default=os.path.join(REPO, "scripts", "zero2.json"))
    parser.add_argument("--zero-stage2", default=os.path.join(REPO, "scripts", "zero3.json"))
    args = parser.parse_args(argv)
    import torch

    root = os.path.join(args.output_dir, "work")
    os.makedirs(root, exist_ok=True)
    n_params, text_tokens = build_inputs(root, args)
    tokens_per_sample = 681 + text_tokens  # released memory (681 tokens) + prompt/answer text
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "llm_params": n_params, "tokens_per_sample": tokens_per_sample,
               "batch_per_gpu": args.batch, "stages": []}
    for stage, zero in ((1, args.zero_stage1), (2, args.zero_stage2)):
        r = run_stage(root, stage, zero, args)
        if "samples_per_s" in r:
            r["tokens_per_s"] = r["samples_per_s"] * tokens_per_sample
            r["mfu"] = 6 * n_params * r["tokens_per_s"] / H100_BF16_DENSE_FLOPS
        results["stages"].append(r)
        print(json.dumps(r), flush=True)
    # What the paper-size run would need: each stage's measured MFU carried over to Vicuna-7B
    # (6.74e9 parameters) on 8 H100s, with the same tokens per sample.
    results["projection_7b_8gpus"] = {}
    for r, samples in zip(results["stages"], (790_000, 763_000)):
        if "tokens_per_s" in r:
            per_gpu = r["tokens_per_s"] * n_params / 6.74e9 / tokens_per_sample  # samples/s per GPU at 7B
            results["projection_7b_8gpus"][f"stage{r['stage']}_epoch_hours"] = samples / (8 * per_gpu) / 3600
    with open(os.path.join(args.output_dir, "bench_train.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
