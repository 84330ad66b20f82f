"""The training benchmark on CPU at a tiny size, two processes: both stages through the real `train()`
under DeepSpeed ZeRO-2 and ZeRO-3 (gloo), so the script cannot rot and the multi-process path works."""

import json
import subprocess
import sys

import pytest

from benchmarks import train as bench_train
from support import REPO


def test_random_weights_cover_every_tensor_without_initialisers():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4))
    state = bench_train.random_state_dict(model)
    assert state.keys() == model.state_dict().keys()
    assert all(state[k].shape == v.shape for k, v in model.state_dict().items())
    assert torch.equal(state["model.norm.weight"], torch.ones(32, dtype=torch.bfloat16))
    q, k = state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"]
    assert 0.01 < q.float().std() < 0.03 and not torch.equal(q, k)


def test_model_flops_per_token_by_stage():
    # stage 1 trains only the adapter under the frozen LLM: forward 2N + activation gradients 2N
    assert bench_train.flops_per_token(1, 10) == 40
    assert bench_train.flops_per_token(2, 10) == 60


def _args(**kw):
    import argparse

    base = dict(scratch_dir=None, device="cuda", steps=20, batch=8, workers=8, compile=True,
                stage2_optimizer="in_backward")
    return argparse.Namespace(**{**base, **kw})


def test_run_flags_baseline_old_path_fast_run_new_path():
    baseline = bench_train.stage_argv("/r", 2, "baseline", "forward", True, "none", [], _args())
    fast = bench_train.stage_argv("/r", 2, "fast", "dataloader", False, "none", [], _args())
    eager = bench_train.stage_argv("/r", 2, "eager", "dataloader", False, "none",
                                   ["--compile_decoder_layers", "False"], _args())
    assert "--trained_weights_fp32" in baseline and "--compile_decoder_layers" not in baseline
    assert "--optim_in_backward" in fast and fast[fast.index("--max_grad_norm") + 1] == "0"
    assert fast[fast.index("--compile_decoder_layers") + 1] == "True" and "--trained_weights_fp32" not in fast
    assert eager[-2:] == ["--compile_decoder_layers", "False"]  # the variant's flag comes last: it wins
    old = bench_train.stage_argv("/r", 2, "fast", "dataloader", True, "none", [], _args(stage2_optimizer="fp32_master"))
    assert "--trained_weights_fp32" in old and "--optim_in_backward" not in old
    zero = bench_train.stage_argv("/r", 2, "fast", "dataloader", True, "z3.json", [], _args())
    assert "--optim_in_backward" not in zero and "--trained_weights_fp32" not in zero


def _run(stage, name, samples_per_s, mfu):
    return {"stage": stage, "run": name, "samples_per_s": samples_per_s, "mfu": mfu}


def test_projection_takes_stage1_from_an_earlier_run(tmp_path):
    shape = {"preset": "7b", "llm_params": 6738415616, "tokens_per_sample": 777, "batch_per_gpu": 8}
    earlier = {**shape, "baseline": [_run(1, "baseline", 10.9, 0.23)],
               "stages": [_run(1, "fast", 19.0, 0.40), {"stage": 2, "run": "fast", "error": "out of memory"}],
               "variants": [_run(1, "compile", 24.8, 0.525)]}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    now = {**shape, "baseline": [_run(2, "baseline", 7.7, 0.244)], "stages": [_run(2, "fast", 14.0, 0.45)],
           "variants": [_run(2, "eager", 11.0, 0.35)]}
    runs = bench_train.fastest_runs(now, "this invocation")
    assert list(runs) == [2] and runs[2]["run"] == "fast"
    runs[1] = bench_train.stage1_from(str(tmp_path / "earlier.json"), now)
    projection = bench_train.project_7b(now, runs)
    assert projection["stage1_from"].endswith("earlier.json, run 'compile'") and projection["stage1_mfu"] == 0.525
    assert projection["stage2_from"] == "this invocation, run 'fast'"
    # at the 7B shape the carried-over rate is the measured one: 790k samples / (8 GPUs x 24.8/s)
    assert abs(projection["stage1_epoch_hours"] - 790_000 / (8 * 24.8) / 3600) < 0.01
    assert projection["both_stages_hours"] == projection["stage1_epoch_hours"] + projection["stage2_epoch_hours"]
    assert bench_train.project_7b(now, {2: runs[2]})["both_stages_hours"] is None
    (tmp_path / "other.json").write_text(json.dumps({**earlier, "tokens_per_sample": 500}))
    with pytest.raises(SystemExit, match="tokens_per_sample"):
        bench_train.stage1_from(str(tmp_path / "other.json"), now)


@pytest.mark.slow  # a long end-to-end run: CI's second step (.ci/run)
def test_two_process_zero2_then_zero3_on_cpu(tmp_path):
    args = ["--output-dir", str(tmp_path), "--device", "cpu", "--gpus", "2", "--hidden", "64",
            "--intermediate", "128", "--layers", "2", "--heads", "4", "--clip-layers", "2", "--steps", "5",
            "--warmup-steps", "2", "--batch", "2", "--records", "16", "--frames", "8", "--workers", "0"]
    result = subprocess.run([sys.executable, "-m", "benchmarks.train", *args],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads((tmp_path / "bench_train.json").read_text())
    assert report["gpus"] == 2 and report["tokens_per_sample"] > 681
    stage1, stage2 = report["stages"]
    assert (stage1["zero"], stage2["zero"]) == ("zero2.json", "zero3.json")
    for stage in (stage1, stage2):
        assert "error" not in stage
        assert stage["steps"] == 5 and stage["samples_per_s"] > 0 and stage["mfu"] > 0
    # the per-sample baseline ran in the same invocation, and every run splits its step into phases
    assert [(b["stage"], b["memory_build"]) for b in report["baseline"]] == [(1, "forward"), (2, "forward")]
    assert all(s["memory_build"] == "dataloader" and s["samples_per_s"] > 0 for s in (stage1, stage2))
    for run in report["baseline"] + report["stages"]:
        assert set(run["phases_s"]) == set(bench_train.PHASES) and run["phases_s"]["forward"] > 0
        assert 0 <= run["memory_build_share"] < 1
    # stage 1: projector + Semantic Attention only; stage 2: everything but the vision tower
    assert stage1["trainable_params"] < report["llm_params"] / 10 < stage2["trainable_params"]
    assert stage2["trainable_params"] > report["llm_params"]  # the LLM plus the adapter
    projection = report["projection_7b"]
    assert projection["stage1_epoch_hours"] > 0 and projection["stage2_epoch_hours"] > 0
    states = projection["stage2_model_state_gib_per_gpu"]
    assert states["zero3"] < states["zero2"] < states["zero1"]
    assert abs(states["zero3"] - 16 * 6.74e9 / 8 / 2**30) < 1e-6
