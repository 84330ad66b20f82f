"""The multi-node path of scripts/train_and_eval.sh (HOSTFILE), as far as one host allows.

The script's launch line is the one it prints with DRY_RUN=1; the slow test runs that very line for both
"nodes" of a two-host hostfile on this machine (the DeepSpeed launcher with --no_ssh, node ranks 0 and 1,
node 0 the rendezvous at 127.0.0.1; DeepSpeed's CPU accelerator, gloo), stage 1 of the tiny model for two
steps, and checks that one job of world size 2 trained and saved its adapter."""

import json
import os
import shlex
import socket
import subprocess
import sys

import pytest
import torch

from flash_vstream.train.train import parse_args

from support import REPO

SCRIPT = os.path.join(REPO, "scripts", "train_and_eval.sh")
ENTRY = "flash_vstream/train/train_mem.py"


def _dry_run(**env):
    result = subprocess.run(["bash", SCRIPT], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "DRY_RUN": "1", "SKIP_EVAL": "1", **env})
    return result, [shlex.split(line) for line in result.stdout.splitlines() if ENTRY in line]


def _hostfile(path, *slots):
    path.write_text("# two nodes\n" + "".join(f"node{i} slots={n}\n" for i, n in enumerate(slots)) + "\n")
    return str(path)


def test_hostfile_sets_nodes_gpus_and_the_global_batch(tmp_path):
    result, stages = _dry_run(HOSTFILE=_hostfile(tmp_path / "hosts", 4, 4))
    assert result.returncode == 0, result.stderr
    for words in stages:
        assert words[:3] == ["deepspeed", "--hostfile", str(tmp_path / "hosts")] and "--no_ssh" not in words
    (_, _, t1), (_, _, t2) = (parse_args(w[w.index(ENTRY) + 1:] + ["--use_cpu", "True"]) for w in stages)
    # 2 nodes x 4 GPUs: the paper's global batches are kept
    assert t1.per_device_train_batch_size * t1.gradient_accumulation_steps * 4 * 2 == 256
    assert t2.per_device_train_batch_size * t2.gradient_accumulation_steps * 4 * 2 == 128


def test_node_rank_launches_this_node_without_ssh(tmp_path):
    hosts = _hostfile(tmp_path / "hosts", 4, 4)
    result, stages = _dry_run(HOSTFILE=hosts, NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29611")
    assert result.returncode == 0, result.stderr
    for words in stages:
        assert words[:words.index(ENTRY)] == ["deepspeed", "--hostfile", hosts, "--no_ssh", "--node_rank", "1",
                                               "--master_addr", "10.0.0.1", "--master_port", "29611"]
    result, _ = _dry_run(HOSTFILE=hosts, NODE_RANK="0")
    assert result.returncode != 0 and "NODE_RANK needs MASTER_ADDR" in result.stderr


def test_two_nodes_of_one_host_through_include(tmp_path):
    """Two "nodes" on one 8-GPU host: each launcher gets its half of the GPUs (DeepSpeed sets CUDA_VISIBLE_DEVICES
    from the included ids; with slots alone both would take GPUs 0-3)."""
    hosts = _hostfile(tmp_path / "hosts", 8, 8)
    include = "node0:0,1,2,3@node1:4,5,6,7"
    result, stages = _dry_run(HOSTFILE=hosts, HOST_INCLUDE=include, NODE_RANK="0", MASTER_ADDR="127.0.0.1")
    assert result.returncode == 0, result.stderr
    assert stages[0][:5] == ["deepspeed", "--hostfile", hosts, "--include", include]
    _, _, t1 = parse_args(stages[0][stages[0].index(ENTRY) + 1:] + ["--use_cpu", "True"])
    assert t1.per_device_train_batch_size * t1.gradient_accumulation_steps * 4 * 2 == 256  # 4 GPUs per node
    result, _ = _dry_run(HOSTFILE=hosts, HOST_INCLUDE="node0:0,1,2@node1:4,5,6,7")
    assert result.returncode == 2 and "as many ids on each" in result.stderr


@pytest.mark.parametrize("content, message", [
    ("node0 slots=4\nnode1 slots=2\n", "N the same on every node (slots found: 2 4)"),
    ("node0\n", "(slots found: none)"),
    (None, "is not a file"),
])
def test_bad_hostfile_is_refused(tmp_path, content, message):
    path = tmp_path / "hosts"
    if content is not None:
        path.write_text(content)
    result, _ = _dry_run(HOSTFILE=str(path))
    assert result.returncode == 2 and message in result.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pretrain_data(tmp_path, tiny_tokenizer_dir):
    """data/pretrain laid out as the script reads it: video features and a LLaVA-format record file."""
    from flash_vstream.demo.tiny import build_tiny_llama
    from flash_vstream.features import save_features

    llm = build_tiny_llama(str(tmp_path / "llm"), tiny_tokenizer_dir, hidden_size=64, num_layers=2, num_heads=4)
    root = tmp_path / "data" / "pretrain"
    generator = torch.Generator().manual_seed(0)
    records = []
    for i in range(4):
        save_features(str(root / "video_features" / f"v{i}.safetensors"),
                      torch.randn(6, 256, 32, generator=generator).half(), {"fps": 1})
        records.append({"id": f"v{i}", "video": f"v{i}.mp4", "conversations": [
            {"from": "human", "value": "<image>\nwhat happens?"}, {"from": "gpt", "value": "a red circle"}]})
    (root / "image_features").mkdir()
    (root / "llava_558k_with_webvid.json").write_text(json.dumps(records))
    return llm, str(tmp_path / "data")


@pytest.mark.slow  # two DeepSpeed launchers, a process each, start and train (~1 min on a loaded 2-core CPU)
def test_two_nodes_on_one_host_train_stage1(tmp_path, pretrain_data, tiny_clip_dir):
    pytest.importorskip("deepspeed")
    llm, data_root = pretrain_data
    hosts, port, out = _hostfile(tmp_path / "hosts", 1, 1), str(_free_port()), tmp_path / "stage1"
    procs = []
    for rank in (0, 1):
        result, stages = _dry_run(HOSTFILE=hosts, NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                  LLM=llm, VISION_TOWER=tiny_clip_dir, DATA_ROOT=data_root,
                                  PRETRAIN_BATCH_PER_GPU="128", FINETUNE_BATCH_PER_GPU="64")  # accumulation 1
        assert result.returncode == 0, result.stderr
        # the script's stage-1 line, run as printed, plus what a CPU smoke needs (later flags win): the CPU (the
        # Trainer then counts the world as DeepSpeed does), fp32, two
        # steps of two samples per rank, no compile, no loader workers, no checkpoints, a scratch output
        # (empty: the script's --resume_from_checkpoint auto finds nothing)
        argv = stages[0] + ["--use_cpu", "True", "--bf16", "False", "--max_steps", "2", "--per_device_train_batch_size", "2",
                            "--compile_decoder_layers", "False", "--dataloader_num_workers", "0",
                            "--save_strategy", "no", "--output_dir", str(out)]
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "DS_BUILD_OPS": "0"}
        log = open(tmp_path / f"node{rank}.log", "w")
        procs.append((subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=600))
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    logs = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in logs)
    for rank, text in enumerate(logs):
        assert f"node_rank={rank}" in text  # each launcher started its own node's process
    assert (out / "mm_projector.bin").exists() and (out / "config.json").exists()
    state = torch.load(out / "mm_projector.bin", map_location="cpu", weights_only=True)
    assert any(k.startswith("model.mm_projector.") for k in state)
    assert any(k.startswith("model.attention_model.") for k in state)
