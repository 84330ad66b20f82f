"""scripts/eval_streaming.sh on the tiny model: the present benchmark runs in two chunks (one per listed
GPU id; CPU here) and is scored from both prediction files; an absent benchmark is skipped."""

import json
import os
import subprocess
import sys

import pytest

from flash_vstream.utils.files import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _question(t, answer):
    return {"task_type": "Object Perception", "question": "what is shown?", "time_stamp": t, "answer": answer,
            "options": ["A. red", "B. blue", "C. green", "D. grey"], "required_ability": "working memory"}


@pytest.mark.slow  # three interpreters start (two chunks, then scoring): about 20 s on 2 cores
def test_eval_streaming_script_runs_chunks_and_scores(tmp_path, tiny_model_dir, make_video):
    bench = tmp_path / "data" / "eval_video" / "StreamingBench"
    os.makedirs(bench / "videos")
    for name in ("v0", "v1"):
        make_video(bench / "videos" / f"{name}.mp4", n=5, rate=1)
    entries = [{"time": "[0:00:00 - 0:00:04]", "questions": [_question("00:00:01", "A"), _question("00:00:03", "B")],
                "video_categories": "test", "video_path": "./videos/v0.mp4"},
               {"time": "[0:00:00 - 0:00:04]", "questions": [_question("00:00:04", "C")],
                "video_categories": "test", "video_path": "./videos/v1.mp4"},
               {"time": "[0:00:00 - 0:00:04]", "questions": [_question("00:00:02", "D")],
                "video_categories": "test", "video_path": "./videos/v0.mp4"}]
    with open(bench / "questions_real.json", "w") as f:
        json.dump(entries, f)
    out = tmp_path / "out"
    env = {**os.environ, "MODEL_PATH": tiny_model_dir, "DATA_ROOT": str(tmp_path / "data"), "GPUS": "0,1",
           "DEVICE": "cpu", "MAX_NEW_TOKENS": "2", "OUTPUT_ROOT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "eval_streaming.sh"), "--no-loglik"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ovobench: skipped" in proc.stdout
    shards = [read_jsonl(out / "streamingbench" / f"predictions_2_{i}.jsonl")[0] for i in range(2)]
    assert [sorted(r["video"] for r in s) for s in shards] == [["./videos/v0.mp4"] * 3, ["./videos/v1.mp4"]]
    result = json.load(open(out / "streamingbench" / "results.json"))
    assert result["total"]["total"] == 4 and result["total"]["missing"] == 0 and result["protocol"] == "stream"
    assert len(result["pred_files"]) == 2
