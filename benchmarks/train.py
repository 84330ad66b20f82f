"""Training throughput on a GPU (a benchmark, not a test): both stages, the per-sample baseline in the same run.

Builds a LLaMA of a chosen shape (`--preset 1b|7b|tiny`) and a CLIP-L/14-shaped vision tower with random
weights on the CPU (the parent never touches the GPU), writes random CLIP features and LLaVA-format
records, then runs the real training entry (`flash_vstream.train.train.train`) in a subprocess per run:

  baseline  `--memory_build forward`: each sample's STAR memory built in the forward pass, one clip at
            a time, with gradient checkpointing; stage 2 without DeepSpeed keeps fp32 trained weights
            under bf16 autocast (`--trained_weights_fp32`, fused AdamW): the earlier training path
  fast      `--memory_build dataloader`: the frozen part of the memory built in the data loader's
            workers (prefetch, pinned memory), the Semantic Attention batched in forward; gradient
            checkpointing as `--stageN-checkpointing` says, `--compile_decoder_layers` as `--compile`
            says; stage 2 without DeepSpeed as `--stage2-optimizer` says (default: AdamW inside the
            backward pass, `--optim_in_backward`, bf16 weights with fp32 masters, no gradient buffer)
  variants  `--variant NAME:STAGE:FLAGS` (the fast run plus FLAGS, which override its own), e.g.
            `--variant eager:2:--compile_decoder_layers False`

For each run it reports samples/s, tokens/s, MFU against 989 TFLOP/s (dense bf16, the datasheet) and
against the bf16 matrix-product rate measured in the same run, peak memory, and a per-phase split of a
step (data wait, prepare, memory build, forward, backward, optimizer, rest); then what the paper-size run
(Vicuna-7B, both stages, one epoch each, 8 GPUs) would take at the measured rates: each stage's fastest
run that is not a baseline, of this invocation or, with `--stage1-from EARLIER/bench_train.json`, stage 1's
from an earlier invocation (named in the projection). Under `--optim_in_backward` the backward phase
includes the optimizer's updates and the optimizer phase is empty.

    python -m benchmarks.train --output-dir OUT [--preset 7b] [--gpus 1] [--steps 20]
                               [--zero-stage1 none|scripts/zero2.json] [--zero-stage2 none|scripts/zero3.json]
                               [--compare-to ONE_GPU_OUT/bench_train.json]

With `--gpus N --compare-to` a one-GPU invocation's bench_train.json (same preset, per-GPU batch and frames),
`scaling` holds each run's speed-up over its one-GPU twin (same stage, run and ZeRO config) and per-GPU memory.

Throughput is steady state: the optimizer steps after the first --warmup-steps, timed from one step's end to
the next on rank 0 (data loading included, start-up and the first steps not). The phase split synchronises
the GPU at each phase boundary (a few syncs per step, a small cost shared by every run). Each run also keeps
every step's time (`step_times_s`, warm-up included) and the median of the timed ones, so a slow step shows.
"""

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

from flash_vstream.utils.files import write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_BF16_DENSE_FLOPS = 989e12  # the datasheet's dense bf16 rate of an H100 / H200 SXM
PRESETS = {  # LLaMA shapes: hidden, intermediate, layers, heads
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4),
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=16),
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32),  # Vicuna-7B
}
PAPER_SAMPLES = {1: 790_000, 2: 763_000}  # one epoch of each stage's data (the paper's stage-1 and stage-2 data, docs/benchmarks.md)
PHASES = ("data_wait", "prepare", "memory_build", "forward", "backward", "optimizer", "rest")


# --- inputs (CPU only) ------------------------------------------------------------------------------
def random_state_dict(model, seed=0):
    """Random weights for a meta-device model without running its initialisers: every tensor a slice of
    one bank of N(0, 0.02) values (norm weights 1). Writing 7B parameters this way takes seconds."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    bank = (torch.randn(1 << 26, generator=generator) * 0.02).to(torch.bfloat16)  # 64M values
    state, offset = {}, 0
    for name, tensor in model.state_dict().items():
        if name.endswith("norm.weight") or "layernorm" in name:
            state[name] = torch.ones(tensor.shape, dtype=torch.bfloat16)
            continue
        n = tensor.numel()
        reps = -(-(offset % bank.numel() + n) // bank.numel())
        flat = bank.repeat(reps) if reps > 1 else bank
        start = offset % bank.numel()
        state[name] = flat[start:start + n].view(tensor.shape).clone()
        offset += 7919 * 4099 + n  # a different window for the next tensor
    return state


def build_inputs(root, args):
    """LLM, CLIP, tokenizer, features and records under `root`; returns (LLM parameters, text tokens)."""
    import torch
    from safetensors.torch import save_file
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                              LlamaForCausalLM)

    from flash_vstream.demo.tiny import TINY_CORPUS, train_tokenizer
    from flash_vstream.features import save_features

    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=args.clip_layers,
                                            num_attention_heads=16, image_size=224, patch_size=14))
    clip.to(torch.bfloat16).save_pretrained(f"{root}/clip")
    CLIPImageProcessor().save_pretrained(f"{root}/clip")
    del clip
    train_tokenizer(TINY_CORPUS * 50, f"{root}/llm", vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(f"{root}/llm")
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         dtype="bfloat16")
    with torch.device("meta"):
        llm = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in llm.parameters())
    config.save_pretrained(f"{root}/llm")
    save_file(random_state_dict(llm), f"{root}/llm/model.safetensors", metadata={"format": "pt"})
    del llm
    os.makedirs(f"{root}/features", exist_ok=True)
    generator = torch.Generator().manual_seed(1)
    for i in range(args.videos):
        save_features(f"{root}/features/v{i}.safetensors",
                      torch.randn(args.frames, 256, 1024, generator=generator).to(torch.float16), {"fps": 1})
    words = " ".join(TINY_CORPUS).split()
    records = []
    for i in range(args.records):
        answer = " ".join(words[(i * 7 + k) % len(words)] for k in range(args.answer_words))
        records.append({"id": f"r{i}", "video": f"v{i % args.videos}.mp4", "conversations": [
            {"from": "human", "value": "<image>\ndescribe what happens in the video in detail."},
            {"from": "gpt", "value": answer}]})
    write_json(f"{root}/data.json", records, indent=None)
    text_tokens = len(tokenizer("<image>\ndescribe what happens in the video in detail. " + answer).input_ids)
    return n_params, text_tokens


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- one run (a subprocess per stage and variant) ----------------------------------------------------
def matmul_peak():
    """The bf16 matrix-product rate of this GPU (TFLOP/s): 8192^3 products, median of 30 after warm-up."""
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(40):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        if i >= 10:
            times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    print(json.dumps({"tflops": 2 * n**3 / times[len(times) // 2] / 1e12}))


def worker(metrics_file, argv):
    """One rank of one run: the real `train()` with a callback timing each step's phases."""
    import torch
    from transformers import TrainerCallback

    from flash_vstream.train.train import train

    cuda = torch.cuda.is_available()

    def now():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class PhaseTimer(TrainerCallback):
        """Phase boundaries of each optimizer step: callbacks for the Trainer's loop, hooks for the model's
        forward (start, end) and the projector (the memory is built and projected before the LLM runs)."""

        def __init__(self):
            self.steps, self.mark = [], {}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.register_forward_pre_hook(lambda *_: self._first("forward_start"))
            model.register_forward_hook(lambda *_: self._first("forward_end"))
            model.get_model().mm_projector.register_forward_hook(lambda *_: self._first("memory_end"))

        def _first(self, key):  # gradient checkpointing re-runs forwards inside backward: keep the first
            if key not in self.mark:
                self.mark[key] = now()

        def on_step_begin(self, args, state, control, **kwargs):
            self.mark = {"begin": now()}

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.mark["optimizer_start"] = now()

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.mark["optimizer_end"] = now()

        def on_step_end(self, args, state, control, **kwargs):
            self.mark["end"] = now()
            self.steps.append(self.mark)

    timer = PhaseTimer()
    started = time.perf_counter()
    trainer = train(argv, callbacks=[timer])
    rank = int(os.environ.get("RANK", 0))
    result = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", 1)), "steps": timer.steps,
              "seconds": time.perf_counter() - started,
              "peak_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
              "reserved_bytes": torch.cuda.max_memory_reserved() if cuda else 0,
              "trainable": sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad),
              "log": trainer.state.log_history}
    write_json(f"{metrics_file}.rank{rank}", result, indent=None)  # whole or absent: the parent reads it
    if torch.distributed.is_initialized():  # leave together: a rank gone early breaks the other's teardown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def stage_argv(root, stage, name, build, checkpointing, zero, extra, args):
    """train() flags of one run: the baseline (`build == "forward"`), or the fast run plus a variant's `extra`."""
    out = f"{args.scratch_dir or root}/stage{stage}-{name}"
    argv = ["--model_name_or_path", f"{root}/llm", "--vision_tower", f"{root}/clip", "--use_features", "True",
            "--video_folder", f"{root}/features", "--data_path", f"{root}/data.json", "--output_dir", out,
            *(["--bf16", "True"] if args.device == "cuda" else ["--use_cpu", "True"]),
            "--gradient_checkpointing", str(checkpointing), "--max_steps", str(args.steps),
            "--per_device_train_batch_size", str(args.batch), "--learning_rate", "1e-3" if stage == 1 else "2e-5",
            "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.03", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", str(args.workers),
            "--model_max_length", "2048", "--version", "plain" if stage == 1 else "v1", "--memory_build", build,
            "--disable_tqdm", "True"]
    if zero != "none":
        argv += ["--deepspeed", zero]
    if build == "dataloader" and args.workers:  # features read ahead by the workers, handed over pinned
        argv += ["--dataloader_prefetch_factor", "4", "--dataloader_pin_memory", "True",
                 "--dataloader_persistent_workers", "True"]
    if stage == 1:
        argv += ["--tune_mm_mlp_adapter", "True"]
    elif os.path.exists(f"{args.scratch_dir or root}/stage1-fast/mm_projector.bin"):
        argv += ["--pretrain_mm_mlp_adapter", f"{args.scratch_dir or root}/stage1-fast/mm_projector.bin"]
    fast = build == "dataloader"
    if fast and args.compile:
        argv += ["--compile_decoder_layers", "True"]
    if stage == 2 and zero == "none":
        if fast and args.stage2_optimizer == "in_backward":
            argv += ["--optim_in_backward", "True", "--max_grad_norm", "0"]
        else:
            argv += ["--trained_weights_fp32", "True", "--optim", "adamw_torch_fused"]
    return argv + list(extra)


def run_stage(root, stage, name, build, checkpointing, extra, args):
    zero = args.zero_stage1 if stage == 1 else args.zero_stage2
    argv = stage_argv(root, stage, name, build, checkpointing, zero, extra, args)
    metrics_file = f"{root}/metrics{stage}-{name}.json"
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # stage 2 at 7B fills the GPU: no fragments
    if args.gpus == 1:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        cmd = [sys.executable, "-m", "benchmarks.train", "--worker", metrics_file, *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.gpus), "--master_addr",
               "127.0.0.1", "--master_port", port, "-m", "benchmarks.train", "--worker", metrics_file, *argv]
    started = time.time()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if "--gradient_checkpointing" in extra:  # a variant's flags override the fast run's choice
        checkpointing = extra[extra.index("--gradient_checkpointing") + 1] == "True"
    head = {"stage": stage, "run": name, "memory_build": build, "gradient_checkpointing": checkpointing,
            "zero": os.path.basename(zero), "flags": " ".join(extra), "argv": " ".join(argv[argv.index("--memory_build"):])}
    if result.returncode:
        return {**head, "error": result.stderr[-4000:]}
    ranks = []
    for rank in range(args.gpus):
        with open(f"{metrics_file}.rank{rank}") as f:
            ranks.append(json.load(f))
    if not (stage == 1 and name == "fast"):  # stage 2 starts from the fast stage-1 adapter; a 7B save is 14-27 GB
        shutil.rmtree(f"{args.scratch_dir or root}/stage{stage}-{name}", ignore_errors=True)
    return {**head, **summarize_stage(stage, ranks, time.time() - started, args)}


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else 0.0


def phase_split(steps, average=None):
    """Mean seconds of each phase over the timed steps (they add up to the mean step), or `average=median`;
    data wait is the gap since the last step's end (the Trainer's logging included)."""
    out = {p: [] for p in PHASES}
    for previous, mark in zip(steps, steps[1:]):
        if not {"forward_start", "forward_end", "optimizer_start", "optimizer_end"} <= set(mark):
            continue
        memory_end = mark.get("memory_end", mark["forward_start"])
        out["data_wait"].append(mark["begin"] - previous["end"])
        out["prepare"].append(mark["forward_start"] - mark["begin"])
        out["memory_build"].append(memory_end - mark["forward_start"])
        out["forward"].append(mark["forward_end"] - memory_end)
        out["backward"].append(mark["optimizer_start"] - mark["forward_end"])
        out["optimizer"].append(mark["optimizer_end"] - mark["optimizer_start"])
        out["rest"].append(mark["end"] - mark["optimizer_end"])
    average = average or (lambda v: sum(v) / len(v) if v else 0.0)
    return {p: average(v) for p, v in out.items()}


def summarize_stage(stage, ranks, wall_s, args):
    """Steady-state throughput: the optimizer steps after the first `--warmup-steps`, timed on rank 0."""
    lead = ranks[0]
    steps = lead["steps"][args.warmup_steps:]
    if len(steps) < 2:
        raise SystemExit(f"stage {stage}: only {len(lead['steps'])} steps ran; raise --steps above --warmup-steps + 1")
    step_s = (steps[-1]["end"] - steps[0]["end"]) / (len(steps) - 1)
    losses = [h["loss"] for h in lead["log"] if "loss" in h]
    phases = phase_split(steps)
    ends = [mark["end"] for mark in lead["steps"]]
    step_times = [b - a for a, b in zip(ends, ends[1:])]  # every step after the first, warm-up included
    return {"gpus": args.gpus, "wall_s": round(wall_s, 1), "steps": len(lead["steps"]), "first_loss": losses[0],
            "last_loss": losses[-1], "step_s": step_s, "step_median_s": median(step_times[args.warmup_steps:]),
            "step_times_s": [round(t, 4) for t in step_times], "samples_per_s": args.batch * args.gpus / step_s,
            "phases_s": phases, "phases_median_s": phase_split(steps, median),
            "memory_build_share": phases["memory_build"] / step_s,
            "peak_gib_per_gpu": max(r["peak_bytes"] for r in ranks) / 2**30,
            "reserved_gib_per_gpu": max(r["reserved_bytes"] for r in ranks) / 2**30,
            "trainable_params": lead["trainable"]}


def flops_per_token(stage, n_params):
    """Model FLOPs per trained token: forward 2N; the backward is 4N when the LLM's weights train (stage 2)
    and 2N when only the adapter below the frozen LLM does (stage 1: activation gradients still flow through
    every layer, weight gradients are not formed). Recomputation by gradient checkpointing is not counted."""
    return (6 if stage == 2 else 4) * n_params


def add_rates(r, n_params, tokens_per_sample, peak_tflops, args):
    if "samples_per_s" not in r:
        return r
    r["tokens_per_s_per_gpu"] = r["samples_per_s"] * tokens_per_sample / args.gpus
    achieved = flops_per_token(r["stage"], n_params) * r["tokens_per_s_per_gpu"]
    r["mfu"] = achieved / H100_BF16_DENSE_FLOPS
    if peak_tflops:
        r["mfu_vs_measured_peak"] = achieved / (peak_tflops * 1e12)
    return r


def fastest_runs(results, source):
    """{stage: run} of the fastest measured run of each stage that is not a baseline, tagged with its source."""
    best = {}
    for r in results["stages"] + results["variants"]:
        if "mfu" in r and (r["stage"] not in best or r["samples_per_s"] > best[r["stage"]]["samples_per_s"]):
            best[r["stage"]] = {**r, "source": f"{source}, run {r['run']!r}"}
    return best


def stage1_from(path, results):
    """Stage 1's fastest run of an earlier bench_train.json of the same shape (for a stage-2-only invocation)."""
    with open(path) as f:
        earlier = json.load(f)
    for key in ("preset", "llm_params", "tokens_per_sample", "batch_per_gpu"):
        if earlier.get(key) != results[key]:
            raise SystemExit(f"--stage1-from {path}: its {key} is {earlier.get(key)!r}, this run's {results[key]!r}")
    best = fastest_runs(earlier, path).get(1)
    if best is None:
        raise SystemExit(f"--stage1-from {path}: it holds no measured stage-1 run")
    return best


def project_7b(results, runs):
    """The paper-size run (Vicuna-7B, both stages, one epoch each) from each stage's run in `runs` ({stage: run}):
    its measured MFU carried over to 6.74B parameters (at the 7B preset: the measured rate itself), assuming 8
    GPUs scale linearly."""
    n7b, gpus = 6.74e9, 8
    out = {"assumes": f"Vicuna-7B ({n7b:.3g} parameters), {gpus} GPUs of the measured kind each as fast as the one "
                      f"measured (linear scaling, not measured here), each stage's fastest measured run that is not "
                      f"a baseline, {results['tokens_per_sample']} tokens per sample",
           # bf16 weights (2 B), bf16 grads (2 B), Adam states: fp32 master, m, v (12 B); ZeRO-1 partitions
           # the states, ZeRO-2 also the grads, ZeRO-3 also the weights (scripts/train_and_eval.sh: ZeRO-1)
           "stage2_model_state_gib_per_gpu": {"zero1": (4 * n7b + 12 * n7b / gpus) / 2**30,
                                              "zero2": (2 * n7b + 14 * n7b / gpus) / 2**30,
                                              "zero3": 16 * n7b / gpus / 2**30}}
    total = 0.0
    for stage, r in sorted(runs.items()):
        per_gpu = r["mfu"] * H100_BF16_DENSE_FLOPS / flops_per_token(stage, n7b) / results["tokens_per_sample"]
        out[f"stage{stage}_from"] = r["source"]
        out[f"stage{stage}_mfu"] = r["mfu"]
        out[f"stage{stage}_samples_per_s_per_gpu"] = per_gpu
        hours = PAPER_SAMPLES[stage] / (gpus * per_gpu) / 3600
        out[f"stage{stage}_epoch_hours"] = hours
        total += hours
    out["both_stages_hours"] = total if len(runs) == 2 else None  # None: a stage was not measured
    return out


def table(results):
    rows = ["| stage | run | step s | samples/s | MFU (989) | MFU (measured peak) | memory build | peak GiB |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results["baseline"] + results["stages"] + results["variants"]:
        if "error" in r:
            rows.append(f"| {r['stage']} | {r['run']} | error | | | | | |")
            continue
        rows.append(f"| {r['stage']} | {r['run']} | {r['step_s']:.3f} | {r['samples_per_s']:.2f} | {r['mfu']:.1%} | "
                    f"{r.get('mfu_vs_measured_peak', 0):.1%} | {r['memory_build_share']:.1%} | "
                    f"{r['peak_gib_per_gpu']:.1f} |")
    return "\n".join(rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1], argv[2:])
    if argv[:1] == ["--matmul-peak"]:
        return matmul_peak()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--preset", default="1b", choices=sorted(PRESETS), help="the LLaMA shape")
    for name in ("hidden", "intermediate", "layers", "heads"):
        parser.add_argument(f"--{name}", type=int, help="overrides the preset")
    parser.add_argument("--gpus", type=int, default=1, help="processes (GPUs) per run; >1 runs under torchrun")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the throughput")
    parser.add_argument("--batch", type=int, default=8, help="per GPU")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--answer-words", type=int, default=60)
    parser.add_argument("--clip-layers", type=int, default=24)
    parser.add_argument("--workers", type=int, default=8, help="dataloader workers per process")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run only")
    parser.add_argument("--stages", default="1,2", help="which stages to run")
    parser.add_argument("--scratch-dir", help="where runs save what train() writes (default: OUTPUT_DIR/work); "
                                              "a 7B stage-2 save is 27 GB, a RAM disk saves a minute")
    parser.add_argument("--no-baseline", action="store_true", help="skip the per-sample (forward) baseline runs")
    parser.add_argument("--stage1-checkpointing", default="False", help="gradient checkpointing of the fast run")
    parser.add_argument("--stage2-checkpointing", default="False", help="gradient checkpointing of the fast run")
    parser.add_argument("--stage2-optimizer", default="in_backward", choices=("in_backward", "fp32_master"),
                        help="the fast stage-2 run without DeepSpeed: AdamW inside the backward pass on bf16 weights "
                             "(--optim_in_backward), or fp32 trained weights under bf16 autocast "
                             "(--trained_weights_fp32, what the baseline always runs)")
    parser.add_argument("--compile", default=None, choices=("True", "False"),
                        help="--compile_decoder_layers in the fast runs (default: True on cuda, False on cpu)")
    parser.add_argument("--stage1-from", metavar="BENCH_TRAIN_JSON",
                        help="an earlier invocation's bench_train.json (same preset and batch): its fastest stage-1 "
                             "run goes into the projection, beside this invocation's stage 2")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:STAGE:FLAGS, the fast run plus train() FLAGS, e.g. 'compile:1:--compile_decoder_layers True'")
    parser.add_argument("--zero-stage1", default=os.path.join(REPO, "scripts", "zero2.json"), help="a JSON, or none")
    parser.add_argument("--zero-stage2", default=os.path.join(REPO, "scripts", "zero3.json"), help="a JSON, or none")
    parser.add_argument("--compare-to", default=None,
                        help="a one-GPU bench_train.json: report the speed-up of each run over its one-GPU twin")
    args = parser.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.compile = args.device == "cuda" if args.compile is None else args.compile == "True"
    stages = [int(s) for s in args.stages.split(",")]
    if args.stage1_from and 1 in stages:
        raise SystemExit("--stage1-from takes stage 1 from an earlier invocation: run --stages 2 with it")

    root = os.path.join(args.output_dir, "work")
    os.makedirs(root, exist_ok=True)
    started = time.time()
    n_params, text_tokens = build_inputs(root, args)
    peak = None
    if args.device == "cuda":  # measured in a subprocess: the parent holds no GPU memory
        out = subprocess.run([sys.executable, "-m", "benchmarks.train", "--matmul-peak"], capture_output=True,
                             text=True, cwd=REPO)
        peak = json.loads(out.stdout.strip().splitlines()[-1])["tflops"] if out.returncode == 0 else None
    tokens_per_sample = 681 + text_tokens  # released memory (681 tokens) + prompt/answer text
    results = {"device": device_name(args), "gpus": args.gpus, "preset": args.preset, "llm_params": n_params,
               "tokens_per_sample": tokens_per_sample, "batch_per_gpu": args.batch, "frames": args.frames,
               "bf16_matmul_peak_tflops": peak, "inputs_s": round(time.time() - started, 1),
               "steps": args.steps, "warmup_steps": args.warmup_steps, "compile_decoder_layers": args.compile,
               "stage2_optimizer": args.stage2_optimizer if args.zero_stage2 == "none" else "deepspeed",
               "baseline": [], "stages": [], "variants": []}
    for stage in stages:
        plan = [] if args.no_baseline else [("baseline", "baseline", "forward", True, [])]
        checkpointing = args.stage1_checkpointing if stage == 1 else args.stage2_checkpointing
        plan.append(("stages", "fast", "dataloader", checkpointing == "True", []))
        for spec in args.variant:
            name, on_stage, flags = spec.split(":", 2)
            if int(on_stage) == stage:
                plan.append(("variants", name, "dataloader", checkpointing == "True", shlex.split(flags)))
        for group, name, build, ckpt, extra in plan:
            r = add_rates(run_stage(root, stage, name, build, ckpt, extra, args), n_params, tokens_per_sample, peak, args)
            results[group].append(r)
            print(json.dumps(r), flush=True)
    for fast in results["stages"]:
        base = [b for b in results["baseline"] if b["stage"] == fast["stage"] and "samples_per_s" in b]
        if base and "samples_per_s" in fast:
            fast["speedup_vs_baseline"] = fast["samples_per_s"] / base[0]["samples_per_s"]
    runs = fastest_runs(results, "this invocation")
    if args.stage1_from:
        runs[1] = stage1_from(args.stage1_from, results)
    results["projection_7b"] = project_7b(results, runs)
    if args.compare_to:
        with open(args.compare_to) as f:
            results["scaling"] = scaling(results, json.load(f), args.compare_to)
    write_json(os.path.join(args.output_dir, "bench_train.json"), results)
    if "scaling" in results:
        print(scaling_table(results["scaling"]))
    print(json.dumps(results["projection_7b"], indent=2))
    print(table(results))
    if any("error" in r for group in ("baseline", "stages", "variants") for r in results[group]):
        sys.exit(1)


SCALING_TARGETS = {2: 1.9, 8: 7.0}  # speed-up over one GPU at the same per-GPU batch, per stage


def scaling(results, one_gpu, source="--compare-to"):
    """Speed-up of this invocation (N GPUs) over a one-GPU invocation, run by run: the one-GPU run of the same
    stage, run name and ZeRO config, at the same per-GPU batch -> {"gpus", "compared_to", "runs": [...]}, each
    run with both samples/s, the speed-up, the scaling efficiency (speed-up / N), both peak GiB per GPU and the
    target where there is one. ValueError when the two invocations did not measure the same thing."""
    if one_gpu.get("gpus") != 1:
        raise ValueError(f"{source}: a one-GPU bench_train.json is needed; this one ran on {one_gpu.get('gpus')} GPUs")
    for key in ("preset", "llm_params", "batch_per_gpu", "frames", "tokens_per_sample"):
        if one_gpu.get(key) != results.get(key):
            raise ValueError(f"{source}: {key} {one_gpu.get(key)!r} there, {results.get(key)!r} here: not the same "
                             "measurement")
    groups = ("baseline", "stages", "variants")
    twins = {(r["stage"], r["run"], r["zero"]): r for g in groups for r in one_gpu.get(g, []) if "samples_per_s" in r}
    gpus, target = results["gpus"], SCALING_TARGETS.get(results["gpus"])
    runs = []
    for r in (r for g in groups for r in results[g] if "samples_per_s" in r):
        row = {"stage": r["stage"], "run": r["run"], "zero": r["zero"], "samples_per_s": r["samples_per_s"],
               "peak_gib_per_gpu": r["peak_gib_per_gpu"]}
        twin = twins.get((r["stage"], r["run"], r["zero"]))
        if twin is None:
            row["note"] = "no one-GPU run of this stage, run and ZeRO config to compare with"
        else:
            speedup = r["samples_per_s"] / twin["samples_per_s"]
            row.update(one_gpu_samples_per_s=twin["samples_per_s"], speedup=speedup, efficiency=speedup / gpus,
                       one_gpu_peak_gib_per_gpu=twin["peak_gib_per_gpu"])
            if target is not None:
                row.update(target=target, met=speedup >= target)
        runs.append(row)
    return {"gpus": gpus, "compared_to": one_gpu.get("device"), "compared_to_file": source, "runs": runs}


def scaling_table(scaling_report):
    n = scaling_report["gpus"]
    rows = [f"| stage | run | ZeRO | samples/s, {n} GPUs | samples/s, 1 GPU | speed-up | efficiency | GiB/GPU, {n} | "
            "GiB/GPU, 1 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in scaling_report["runs"]:
        if "speedup" not in r:
            rows.append(f"| {r['stage']} | {r['run']} | {r['zero']} | {r['samples_per_s']:.2f} | - | - | - | "
                        f"{r['peak_gib_per_gpu']:.1f} | - |")
            continue
        rows.append(f"| {r['stage']} | {r['run']} | {r['zero']} | {r['samples_per_s']:.2f} | "
                    f"{r['one_gpu_samples_per_s']:.2f} | {r['speedup']:.2f}x | {r['efficiency']:.0%} | "
                    f"{r['peak_gib_per_gpu']:.1f} | {r['one_gpu_peak_gib_per_gpu']:.1f} |")
    return "\n".join(rows)


def device_name(args):
    if args.device != "cuda":
        return "cpu"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "cuda"


if __name__ == "__main__":
    main()
