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
