"""Evaluation and feature extraction sharded over N processes, one per GPU, through the real scripts.

On the CPU: scripts/eval.sh with GPUS=0,1 (each shard a process with CUDA_VISIBLE_DEVICES set to its GPU;
without CUDA the processes run on the CPU) merges to the predictions and scores of one shard, and
scripts/extract_features.sh with NUM_CHUNKS=2 writes the features of one process. The runs on N GPUs are
the same commands (docs/benchmarks.md, "Several GPUs")."""

import json
import os
import subprocess

import pytest
import torch

from flash_vstream.features import load_features_with_meta
from flash_vstream.utils.files import read_jsonl
from support import REPO

EVAL_SH = os.path.join(REPO, "scripts", "eval.sh")
EXTRACT_SH = os.path.join(REPO, "scripts", "extract_features.sh")
ANSWER_KEYS = ("id", "question", "answer", "pred", "error")


def _sh(script, env, *args):
    return subprocess.run(["bash", script, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def _records(path):
    records, bad = read_jsonl(path)
    assert bad == []
    return records


def _answers(path):
    return [{k: r.get(k) for k in ANSWER_KEYS} for r in _records(path)]


@pytest.mark.slow  # three inference processes start (~80 s on a loaded 2-core CPU); in process: test_inference.py
def test_eval_sh_two_pinned_shards_merge_to_one_shard(tiny_model_dir, make_qa_tree, tmp_path):
    data = tmp_path / "data"
    make_qa_tree(data / "eval_video" / "MSVD-QA")
    common = {"MODEL_PATH": tiny_model_dir, "DATA_ROOT": str(data), "DATASETS": "msvd", "JUDGE": "exact",
              "MAX_NEW_TOKENS": "3"}
    one = _sh(EVAL_SH, {**common, "OUTPUT_ROOT": str(tmp_path / "one"), "DEVICE": "cpu"})
    assert one.returncode == 0, one.stderr[-3000:]
    two = _sh(EVAL_SH, {**common, "OUTPUT_ROOT": str(tmp_path / "two"), "GPUS": "0,1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 chunk(s) on GPUs 0,1" in two.stderr
    assert "chunk 0/2 on GPU 0" in two.stderr and "chunk 1/2 on GPU 1" in two.stderr  # CUDA_VISIBLE_DEVICES per shard
    shards = sorted(os.listdir(tmp_path / "two" / "msvd" / "shards"))
    assert shards == ["2_0.jsonl", "2_1.jsonl"]
    sizes = [len(_records(tmp_path / "two" / "msvd" / "shards" / s)) for s in shards]
    assert sizes == [2, 3]  # contiguous, balanced: 5 questions
    merged, single = (_answers(tmp_path / run / "msvd" / "pred.jsonl") for run in ("two", "one"))
    assert merged == single and len(merged) == 5
    scores = [json.loads((tmp_path / run / "msvd" / "exact" / "results.json").read_text()) for run in ("one", "two")]
    for key in ("total", "judged", "failed", "yes", "no", "accuracy"):
        assert scores[0][key] == scores[1][key], key


@pytest.mark.slow  # three extraction processes start (~45 s on a loaded 2-core CPU)
def test_extract_features_sh_two_shards_write_what_one_writes(make_video, tiny_clip_dir, tmp_path):
    runs = {}
    for chunks in ("1", "2"):
        data = tmp_path / f"data{chunks}"
        videos = data / "eval_video" / "MSVD-QA" / "videos"
        videos.mkdir(parents=True)
        for i in range(3):
            make_video(videos / f"v{i}.mp4", n=6 + 2 * i, rate=2)
        result = _sh(EXTRACT_SH, {"DATA": str(data), "EVAL_DATASETS": "MSVD-QA", "VISION_TOWER": tiny_clip_dir,
                                  "DEVICE": "cpu", "NUM_CHUNKS": chunks, "DTYPE": "fp32", "NUM_WORKERS": "1",
                                  "BATCH_SIZE": "4"}, "eval")
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert f"({chunks} process(es), cpu)" in result.stdout
        runs[chunks] = data / "eval_video" / "MSVD-QA" / "video_features"
    assert sorted(os.listdir(runs["2"])) == ["extract_report.chunk0of2.json", "extract_report.chunk1of2.json",
                                             "v0.safetensors", "v1.safetensors", "v2.safetensors"]
    done = [os.path.basename(f) for i in range(2)
            for f in json.loads((runs["2"] / f"extract_report.chunk{i}of2.json").read_text())["done"]]
    assert sorted(done) == sorted(os.path.basename(f) for f in
                                  json.loads((runs["1"] / "extract_report.json").read_text())["done"])
    for i in range(3):
        (a, meta_a), (b, meta_b) = (load_features_with_meta(str(runs[c] / f"v{i}.safetensors")) for c in ("1", "2"))
        assert meta_a["timestamps"] == meta_b["timestamps"] and a.shape[0] == 3 + i
        torch.testing.assert_close(a, b)


def test_extract_features_sh_rejects_a_bad_chunk_count(tmp_path):
    result = _sh(EXTRACT_SH, {"DATA": str(tmp_path), "DEVICE": "cpu", "NUM_CHUNKS": "0"}, "eval")
    assert result.returncode == 2 and "NUM_CHUNKS must be a whole number >= 1" in result.stderr
