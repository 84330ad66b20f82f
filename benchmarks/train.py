"""Training throughput on a GPU (a benchmark, not a test): stage 1 and stage 2 for a few dozen steps.

Builds a LLaMA of a chosen shape (default ~1.1B: hidden 2048, 22 layers) and a CLIP-L/14-shaped
vision tower with random weights, writes random CLIP features and LLaVA-format records, then runs
the real training entry (`flash_vstream.train.train.train`) through DeepSpeed for each stage and
reports samples/s, tokens/s, peak GPU memory and model-FLOPs utilisation per GPU (see
`flops_per_token`), plus what the 7B run would take at the measured utilisation.

    python -m benchmarks.train --output-dir OUT [--gpus 2] [--steps 30] [--zero-stage1 scripts/zero2.json]
                                  [--zero-stage2 scripts/zero3.json]

Throughput is steady state: the optimizer steps after the first --warmup-steps, timed from one step's
end to the next on rank 0 (data loading included, start-up and the first steps not).
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


def worker(metrics_file, argv):
    """One rank of one stage: the real `train()` with a callback timing each optimizer step."""
    import torch
    from transformers import TrainerCallback

    from flash_vstream.train.train import train

    cuda = torch.cuda.is_available()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    timer = StepTimer()
    started = time.perf_counter()
    trainer = train(argv, callbacks=[timer])
    rank = int(os.environ.get("RANK", 0))
    result = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", 1)), "step_ends": timer.ends,
              "seconds": time.perf_counter() - started,
              "peak_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
              "reserved_bytes": torch.cuda.max_memory_reserved() if cuda else 0,
              "trainable": sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad),
              "log": trainer.state.log_history}
    with open(f"{metrics_file}.rank{rank}", "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():  # leave together: a rank gone early breaks the other's teardown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_stage(root, stage, zero, args):
    out = f"{root}/stage{stage}"
    argv = ["--model_name_or_path", f"{root}/llm", "--vision_tower", f"{root}/clip", "--use_features", "True",
            "--video_folder", f"{root}/features", "--data_path", f"{root}/data.json", "--output_dir", out,
            *(["--bf16", "True"] if args.device == "cuda" else ["--use_cpu", "True"]),
            "--gradient_checkpointing", "True", "--deepspeed", zero, "--max_steps", str(args.steps),
            "--per_device_train_batch_size", str(args.batch), "--learning_rate", "1e-3" if stage == 1 else "2e-5",
            "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.03", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", str(args.workers),
            "--model_max_length", "2048", "--version", "plain" if stage == 1 else "v1"]
    if stage == 1:
        argv += ["--tune_mm_mlp_adapter", "True"]
    else:
        argv += ["--pretrain_mm_mlp_adapter", f"{root}/stage1/mm_projector.bin"]
    metrics_file = f"{root}/metrics{stage}.json"
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.gpus == 1:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        cmd = [sys.executable, "-m", "benchmarks.train", "--worker", metrics_file, *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.gpus),
               "--master_addr", "127.0.0.1", "--master_port", port, "-m", "benchmarks.train", "--worker", metrics_file, *argv]
    started = time.time()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        return {"stage": stage, "zero": os.path.basename(zero), "error": result.stderr[-4000:]}
    ranks = []
    for rank in range(args.gpus):
        with open(f"{metrics_file}.rank{rank}") as f:
            ranks.append(json.load(f))
    return summarize_stage(stage, zero, ranks, time.time() - started, args)


def summarize_stage(stage, zero, ranks, wall_s, args):
    """Steady-state throughput: the optimizer steps after the first `--warmup-steps`, timed on rank 0."""
    lead = ranks[0]
    ends = lead["step_ends"]
    timed = ends[args.warmup_steps:]
    if len(timed) < 2:
        raise SystemExit(f"stage {stage}: only {len(ends)} steps ran; raise --steps above --warmup-steps + 1")
    step_s = (timed[-1] - timed[0]) / (len(timed) - 1)
    losses = [h["loss"] for h in lead["log"] if "loss" in h]
    return {"stage": stage, "zero": os.path.basename(zero), "gpus": args.gpus, "wall_s": round(wall_s, 1),
            "steps": len(ends), "first_loss": losses[0], "last_loss": losses[-1],
            "step_s": step_s, "samples_per_s": args.batch * args.gpus / step_s,
            "peak_gib_per_gpu": max(r["peak_bytes"] for r in ranks) / 2**30,
            "reserved_gib_per_gpu": max(r["reserved_bytes"] for r in ranks) / 2**30,
            "trainable_params": lead["trainable"]}


def flops_per_token(stage, n_params):
    """Model FLOPs per trained token: forward 2N; the backward is 4N when the LLM's weights train (stage 2)
    and 2N when only the adapter below the frozen LLM does (stage 1: activation gradients still flow through
    every layer, weight gradients are not formed). Recomputation by gradient checkpointing is not counted."""
    return (6 if stage == 2 else 4) * n_params


def project_7b(results, args):
    """What the paper-size run needs, from each stage's measured MFU carried over to Vicuna-7B."""
    n7b, gpus = 6.74e9, 8
    out = {"assumes": f"Vicuna-7B ({n7b:.3g} parameters), {gpus} H100s, the measured MFU of each stage, "
                      f"{results['tokens_per_sample']} tokens per sample",
           # bf16 weights (2 B), bf16 grads (2 B), Adam states: fp32 master, m, v (12 B); ZeRO-1 partitions
           # the states, ZeRO-2 also the grads, ZeRO-3 also the weights (scripts/train_and_eval.sh: ZeRO-1)
           "stage2_model_state_gib_per_gpu": {"zero1": (4 * n7b + 12 * n7b / gpus) / 2**30,
                                              "zero2": (2 * n7b + 14 * n7b / gpus) / 2**30,
                                              "zero3": 16 * n7b / gpus / 2**30}}
    for r, samples in zip(results["stages"], (790_000, 763_000)):
        if "mfu" not in r:
            continue
        per_gpu = r["mfu"] * H100_BF16_DENSE_FLOPS / flops_per_token(r["stage"], n7b) / results["tokens_per_sample"]
        out[f"stage{r['stage']}_samples_per_s_per_gpu"] = per_gpu
        out[f"stage{r['stage']}_epoch_hours"] = samples / (gpus * per_gpu) / 3600
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--gpus", type=int, default=1, help="processes (GPUs) per stage; >1 runs under torchrun")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the throughput")
    parser.add_argument("--batch", type=int, default=8, help="per GPU")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--answer-words", type=int, default=60)
    parser.add_argument("--clip-layers", type=int, default=24)
    parser.add_argument("--workers", type=int, default=4, help="dataloader workers per process")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run only")
    parser.add_argument("--stages", default="1,2", help="which stages to run (stage 2 needs stage 1's adapter)")
    parser.add_argument("--zero-stage1", default=os.path.join(REPO, "scripts", "zero2.json"))
    parser.add_argument("--zero-stage2", default=os.path.join(REPO, "scripts", "zero3.json"))
    args = parser.parse_args(argv)
    import torch

    root = os.path.join(args.output_dir, "work")
    os.makedirs(root, exist_ok=True)
    n_params, text_tokens = build_inputs(root, args)
    tokens_per_sample = 681 + text_tokens  # released memory (681 tokens) + prompt/answer text
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "gpus": args.gpus,
               "llm_params": n_params, "tokens_per_sample": tokens_per_sample, "batch_per_gpu": args.batch,
               "stages": []}
    stages = [int(s) for s in args.stages.split(",")]
    for stage, zero in ((1, args.zero_stage1), (2, args.zero_stage2)):
        if stage not in stages:
            continue
        r = run_stage(root, stage, zero, args)
        if "samples_per_s" in r:
            r["tokens_per_s_per_gpu"] = r["samples_per_s"] * tokens_per_sample / args.gpus
            r["mfu"] = flops_per_token(stage, n_params) * r["tokens_per_s_per_gpu"] / H100_BF16_DENSE_FLOPS
        results["stages"].append(r)
        print(json.dumps(r), flush=True)
    results["projection_7b"] = project_7b(results, args)
    with open(os.path.join(args.output_dir, "bench_train.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    if any("error" in r for r in results["stages"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
