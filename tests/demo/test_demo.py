"""A shortened run of the embedded demo: the whole chain (data -> features -> stage 1 -> stage 2 ->
evaluation -> realtime CLI -> table) on a handful of tiny streams, in well under a minute."""

import json
import os
import subprocess
import sys

import pytest

from flash_vstream.demo import run_demo, synthetic

from support import REPO


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = subprocess.run([sys.executable, "-m", "flash_vstream.demo.run_demo", "--output", str(out),
                             "--preset", "quick", "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_demo_runs_every_step_and_prints_the_table(demo):
    out, stdout = demo
    paths = run_demo.demo_paths(str(out))
    assert os.path.isfile(os.path.join(paths["stage1"], "mm_projector.bin"))
    assert os.path.isfile(os.path.join(paths["stage2"], "model.safetensors"))
    results = json.load(open(paths["results"]))
    rows = results["accuracy"]
    assert set(rows) == {"Flash-VStream (tiny)", "spatial-only", "majority answer"}
    with open(paths["test_qa"]) as f:
        test = json.load(f)
    families = {q["answer_type"] for q in test}
    for name, row in rows.items():
        assert set(row) >= families | {"all"}, name
        assert all(0.0 <= v <= 100.0 for v in row.values())
    assert "Held-out accuracy" in stdout and "majority answer" in stdout
    # both saw the stream up to the question (the ablation's memory filled with its newest frame)
    full = [json.loads(line) for line in open(os.path.join(paths["eval"], "full", "pred.jsonl"))]
    ablation = [json.loads(line) for line in open(os.path.join(paths["eval"], "spatial_only", "pred.jsonl"))]
    assert len(full) == len(ablation) == len(test)
    assert {a["generation"]["last_frames"] for a in ablation} == {1}
    times = {q["id"]: q["time"] for q in test}
    assert all(f["frames"] == times[f["id"]] + 1 for f in full)


def test_demo_realtime_answers_and_memory_timeline(demo):
    out, stdout = demo
    paths = run_demo.demo_paths(str(out))
    answers = [json.loads(line) for line in open(os.path.join(paths["realtime"], "answers.jsonl"))]
    questions = [json.loads(line) for line in open(os.path.join(paths["realtime"], "questions.jsonl"))]
    assert [a["question"] for a in answers] == [q["question"] for q in questions]
    for a, q in zip(answers, questions):
        assert a["frames_seen"] == q["time"] + 1  # answered from the memory at the question time
    with open(paths["memory_plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_reuses_finished_steps(demo):
    out, _ = demo
    result = subprocess.run([sys.executable, "-m", "flash_vstream.demo.run_demo", "--output", str(out),
                             "--preset", "quick", "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for step in ("stage 1", "stage 2", "evaluate: full STAR memory", "realtime CLI"):
        assert any(step in line and "done already" in line for line in result.stdout.splitlines()), step


def test_majority_baseline_is_the_most_frequent_training_answer(tmp_path):
    paths = run_demo.demo_paths(str(tmp_path))
    os.makedirs(paths["data"])
    train = [{"answer_type": "spatial", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": v}]}
             for v in ("red", "red", "blue")]
    test = [{"answer_type": "spatial", "answer": a, "question": "q", "id": str(i), "video_id": "v"}
            for i, a in enumerate(("red", "blue", "red", "green"))]
    json.dump(train, open(paths["finetune_json"], "w"))
    json.dump(test, open(paths["test_qa"], "w"))
    assert run_demo.majority_baseline(paths) == {"spatial": 50.0, "all": 50.0}
    assert set(synthetic.FAMILIES) >= {"spatial", "start"}


def test_two_runs_of_the_same_preset_give_identical_results(demo, tmp_path):
    """The demo is reproducible: a second run from nothing trains the same weights, answers the same and prints
    the same table (only the wall-clock times differ)."""
    out, stdout = demo
    again = tmp_path / "again"
    result = subprocess.run([sys.executable, "-m", "flash_vstream.demo.run_demo", "--output", str(again),
                             "--preset", "quick", "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first, second = run_demo.demo_paths(str(out)), run_demo.demo_paths(str(again))
    assert json.load(open(first["results"]))["accuracy"] == json.load(open(second["results"]))["accuracy"]
    for name in ("model.safetensors",):
        with open(os.path.join(first["stage2"], name), "rb") as a, open(os.path.join(second["stage2"], name), "rb") as b:
            assert a.read() == b.read(), f"stage 2 {name} differs between two runs"

    def answers(paths):
        return [(line["id"], line["pred"]) for line in map(json.loads, open(os.path.join(paths["eval"], "full",
                                                                                          "pred.jsonl")))]

    assert answers(first) == answers(second)
