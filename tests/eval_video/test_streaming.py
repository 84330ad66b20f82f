"""Streaming benchmarks: the official formats, each benchmark's scoring rules by hand, and the whole CLI on
the tiny model over generated videos (one pass per video, the clip protocol, resume, score-only)."""

import json
import os

import pytest

from flash_vstream.eval_video import streaming
from flash_vstream.eval_video.streaming_bench import loaders
from flash_vstream.eval_video.streaming_bench.loaders import (export_synthetic_streamingbench, load_annotations,
                                                              parse_clock)
from flash_vstream.eval_video.streaming_bench.scoring import score
from flash_vstream.utils.files import read_jsonl


def _write(path, obj):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return str(path)


def _sb_question(task, t, answer, question="what is shown?"):
    return {"task_type": task, "question": question, "time_stamp": t, "answer": answer,
            "options": ["A. red", "B. blue", "C. green", "D. grey"], "required_ability": "working memory"}


def streamingbench_file(path, videos=("./videos/v0.mp4", "./videos/v1.mp4")):
    """StreamingBench's questions_real.json layout: one entry per (video, time window), questions inside."""
    return _write(path, [
        {"time": "[0:00:00 - 0:00:03]", "questions": [_sb_question("Object Perception", "00:00:01", "A"),
                                                      _sb_question("Causal Reasoning", "00:00:03", "B")],
         "video_categories": "test", "video_path": videos[0]},
        {"time": "[0:00:00 - 0:00:05]", "questions": [_sb_question("Object Perception", "00:00:04", "C")],
         "video_categories": "test", "video_path": videos[1]},
        {"time": "[0:00:00 - 0:00:05]", "questions": [_sb_question("Object Perception", "0:00:02", "D")],
         "video_categories": "test", "video_path": videos[0]},
    ])


def ovobench_items(video="v0.mp4"):
    """OVO-Bench's ovo_bench_new.json layout: backward / real-time items and forward items with test_info."""
    opts = ["a cup", "a dog", "a car", "a tree"]
    return [
        {"id": 1, "task": "EPM", "video": video, "realtime": 3.0, "question": "what was picked up?",
         "options": opts, "gt": 1},
        {"id": 2, "task": "ASI", "video": video, "realtime": 2.0, "question": "what came next?", "options": opts,
         "gt": 0},
        {"id": 3, "task": "OCR", "video": video, "realtime": 1.0, "question": "what is written?", "options": opts,
         "gt": 2},
        {"id": 4, "task": "REC", "video": video, "activity": "jump",
         "test_info": [{"realtime": 1.0, "count": 1}, {"realtime": 4.0, "count": 3}]},
        {"id": 5, "task": "SSR", "video": video,
         "test_info": [{"realtime": 2.0, "step": "cut the bread", "type": 1},
                       {"realtime": 5.0, "step": "pour the milk", "type": 0}]},
        {"id": 6, "task": "CRR", "video": video, "question": "what colour is the car?", "answer": "red",
         "test_info": [{"realtime": 1.0, "type": 0}, {"realtime": 3.0, "type": 1}]},
    ]


def _video(make_video, path, n):
    """A clip of n frames at 1 fps (frame k at k s)."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    return make_video(path, n=n, rate=1)


def _preds(queries, replies, loglik=None):
    out = {}
    for q in queries:
        reply = replies.get(q["key"])
        if reply is not None:
            out[q["key"]] = {"key": q["key"], "answer": reply,
                             **({"loglik_index": loglik[q["key"]]} if loglik and q["key"] in loglik else {})}
    return out


# ---------------------------------------------------------------- loaders

def test_streamingbench_loader_reads_every_field_and_names_bad_items(tmp_path):
    path = streamingbench_file(tmp_path / "questions_real.json")
    data = json.load(open(path))
    data[1]["questions"].append({"task_type": "Object Perception", "question": "q", "answer": "A",
                                 "options": ["A. x", "B. y"]})  # no time_stamp
    data[0]["questions"].append(_sb_question("Object Perception", "00:00:02", "E"))  # E names no option
    data.append({"questions": []})  # no video_path
    _write(path, data)
    queries, problems = load_annotations("streamingbench", path)
    assert [q["key"] for q in queries] == ["0.0", "0.1", "1.0", "2.0"]
    q = queries[1]
    assert (q["video"], q["time"], q["task"], q["gt"], q["gt_index"]) == ("./videos/v0.mp4", 3.0, "Causal Reasoning",
                                                                          "B", 1)
    assert q["choices"] == ["red", "blue", "green", "grey"]  # the letters are the prompt's, not the options'
    assert "A. red\nB. blue" in q["prompt"] and q["ids"]["task_type"] == "Causal Reasoning"
    assert len(problems) == 3
    assert all(path in p for p in problems)
    assert any("entry 1" in p and "question 1" in p and "time_stamp" in p for p in problems)
    assert any("entry 0" in p and "'E'" in p for p in problems)
    assert any("entry 3" in p and "video_path" in p for p in problems)


def test_ovobench_loader_splits_forward_tasks_into_test_points(tmp_path):
    items = ovobench_items()
    items.append({"id": 7, "task": "EPM", "video": "v0.mp4", "realtime": 1.0, "question": "q",
                  "options": ["a", "b"]})  # no gt
    items.append({"id": 8, "task": "XYZ", "video": "v0.mp4"})
    path = _write(tmp_path / "ovo_bench_new.json", items)
    queries, problems = load_annotations("ovobench", path)
    assert [q["key"] for q in queries] == ["1", "2", "3", "4/0", "4/1", "5/0", "5/1", "6/0", "6/1"]
    by_key = {q["key"]: q for q in queries}
    assert by_key["1"]["gt"] == "B" and by_key["1"]["category"] == "Backward Tracing"
    assert by_key["4/1"]["gt"] == 3 and by_key["4/1"]["time"] == 4.0 and by_key["4/1"]["ids"]["test_index"] == 1
    assert "jump" in by_key["4/0"]["prompt"]
    assert "pour the milk" in by_key["5/1"]["prompt"] and by_key["5/1"]["gt"] == 0
    assert by_key["6/1"]["choices"] == ["No", "Yes"] and by_key["6/1"]["gt_index"] == 1
    assert len(problems) == 2 and all(path in p for p in problems)
    assert any("id 7" in p and "'gt'" in p for p in problems) and any("id 8" in p and "XYZ" in p for p in problems)


def test_vstream_and_mcq_loaders(tmp_path):
    path = _write(tmp_path / "test_qa_ego4d.json", [
        {"video_id": "e0", "question": "what did I hold?", "id": "e0_1", "answer": "a cup", "answer_type": "object",
         "duration": 8, "start_time": 1, "end_time": 3},
        {"video_id": "e0", "question": "where?", "id": "e0_2", "answer": "kitchen", "start_time": 5, "end_time": 2},
        {"video_id": "e0", "question": "no time", "id": "e0_3", "answer": "x"},
    ])
    queries, problems = load_annotations("vstream", path)
    assert [(q["key"], q["time"], q["task"]) for q in queries] == [("e0_1", 3.0, "object")]
    assert len(problems) == 2 and any("e0_2" in p and "start_time" in p for p in problems)
    assert any("e0_3" in p and "end_time" in p for p in problems)
    mcq = _write(tmp_path / "mcq.json", [
        {"videoID": "m0", "question_id": "m0-1", "question": "which?", "options": ["A. one", "B. two"], "answer": "B",
         "task_type": "counting"},
        {"video": "m1", "question": "which?", "candidates": ["one", "two", "three"], "answer": "three"},
    ])
    queries, problems = load_annotations("mcq", mcq)
    assert problems == []
    assert [(q["key"], q["video"], q["gt_index"], q["time"]) for q in queries] == [("m0-1", "m0", 1, None),
                                                                                 ("1", "m1", 2, None)]


def test_parse_clock():
    assert parse_clock("00:03:10") == 190 and parse_clock("1:05") == 65 and parse_clock(7) == 7.0
    with pytest.raises(ValueError):
        parse_clock("1:2:3:4")


# ---------------------------------------------------------------- scoring by hand

def test_streamingbench_scoring_first_letter_strict(tmp_path):
    queries, _ = load_annotations("streamingbench", streamingbench_file(tmp_path / "q.json"))
    # gt: 0.0 A (Object Perception), 0.1 B (Causal), 1.0 C (Object), 2.0 D (Object)
    replies = {"0.0": "A. red", "0.1": "(B)", "1.0": "c"}  # 2.0 has no prediction
    result, verdicts = score("streamingbench", queries, _preds(queries, replies, loglik={"0.0": 0, "0.1": 1,
                                                                                         "1.0": 0}))
    # count.py: first character == answer; "(B)" and "c" are wrong; the missing question is not counted
    op, cr = result["tasks"]["Object Perception"], result["tasks"]["Causal Reasoning"]
    assert (op["correct"], op["scored"], op["total"], op["missing"]) == (1, 2, 3, 1)
    assert op["accuracy"] == pytest.approx(1 / 2) and cr["accuracy"] == 0.0
    assert result["total"]["accuracy"] == pytest.approx(1 / 3) and result["missing_keys"] == ["2.0"]
    # the judge-free column: loglik indices 0 (right), 1 (right), 0 (wrong, gt C)
    assert op["loglik_accuracy"] == pytest.approx(1 / 2) and result["total"]["loglik_accuracy"] == pytest.approx(2 / 3)
    assert [v["correct"] for v in verdicts] == [True, False, False, None]


def test_ovobench_scoring_lenient_and_strict_cases(tmp_path):
    queries, _ = load_annotations("ovobench", _write(tmp_path / "ovo.json", ovobench_items()))
    replies = {
        "1": "I think B",  # gt B: letter anywhere in the reply -> right (lenient)
        "2": "b",  # gt A: wrong
        "3": "C.",  # gt C: right
        "4/0": "1 time",  # count 1: digits "1" -> right
        "4/1": "2 or 3",  # count 3: digits "23" -> wrong
        "5/0": "yes",  # type 1: "Yes" is case-sensitive -> wrong
        "5/1": "N",  # type 0: exactly "N" -> right
        "6/0": "Not yet",  # type 0: contains "No" -> right (lenient)
        # 6/1 missing: scores 0 and stays in the count
    }
    result, _ = score("ovobench", queries, _preds(queries, replies))
    tasks = {t: g["accuracy"] for t, g in result["tasks"].items()}
    assert tasks == {"EPM": 1.0, "ASI": 0.0, "OCR": 1.0, "REC": 0.5, "SSR": 0.5, "CRR": 0.5}
    cats = {c: v["accuracy"] for c, v in result["categories"].items()}
    assert cats == {"Backward Tracing": 0.5, "Real-Time Visual Perception": 1.0,
                    "Forward Active Responding": pytest.approx(0.5)}
    # the total is the mean of the three categories; score.py's print is the mean of the six tasks
    assert result["total"]["accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert result["total"]["total_task_mean"] == pytest.approx(3.5 / 6)
    assert result["tasks"]["CRR"]["missing"] == 1 and result["tasks"]["CRR"]["scored"] == 2


def test_vstream_exact_and_mcq_option_scoring(tmp_path):
    queries, _ = load_annotations("vstream", _write(tmp_path / "v.json", [
        {"video_id": "e0", "question": "q1", "id": "a", "answer": "yes", "answer_type": "yn", "end_time": 1},
        {"video_id": "e0", "question": "q2", "id": "b", "answer": "two dogs", "answer_type": "count", "end_time": 2},
        {"video_id": "e0", "question": "q3", "id": "c", "answer": "red", "answer_type": "count", "end_time": 2}]))
    result, _ = score("vstream", queries, _preds(queries, {"a": "Yes, it is.", "b": "The 2 dogs.", "c": "a red car"}))
    assert result["tasks"]["yn"]["accuracy"] == 1.0 and result["tasks"]["count"]["accuracy"] == 0.5
    assert result["total"]["accuracy"] == pytest.approx(2 / 3)
    queries, _ = load_annotations("mcq", _write(tmp_path / "m.json", [
        {"video": "m", "id": i, "question": "q", "options": ["one", "two", "three"], "answer": a}
        for i, a in enumerate(["A", 1, "three"])]))
    result, _ = score("mcq", queries, _preds(queries, {"0": "(A) one", "1": "two", "2": "B"}))
    assert result["total"]["correct"] == 2 and result["total"]["scored"] == 3


# ---------------------------------------------------------------- the CLI on the tiny model

def _run(argv):
    assert streaming.main(argv) == 0


def test_cli_streams_each_video_once_and_resumes(tmp_path, tiny_model_dir, make_video):
    video_dir = tmp_path / "StreamingBench"
    _video(make_video, video_dir / "videos" / "v0.mp4", 6)  # frames at 0..5 s
    _video(make_video, video_dir / "videos" / "v1.mp4", 5)
    anno = streamingbench_file(video_dir / "questions_real.json")
    out = tmp_path / "out"
    base = ["--benchmark", "streamingbench", "--anno", anno, "--video-dir", str(video_dir), "--model-path",
            tiny_model_dir, "--max-new-tokens", "4", "--device", "cpu", "--encode-batch", "2"]
    argv = [*base, "--output-dir", str(out)]
    _run(argv)
    lines, _ = read_jsonl(out / "predictions.jsonl")
    assert len(lines) == 4 and not any(r.get("error") for r in lines)
    by_key = {r["key"]: r for r in lines}
    # v0's questions at 1, 2, 3 s came in time order from one pass: the memory had seen frames 0..t
    assert [by_key[k]["frames_seen"] for k in ("0.0", "2.0", "0.1")] == [2, 3, 4]
    assert [by_key[k]["stream_time"] for k in ("0.0", "2.0", "0.1")] == [1.0, 2.0, 3.0]
    assert [r["key"] for r in lines[:3]] == ["0.0", "2.0", "0.1"]  # answered as the stream reached them
    r = by_key["1.0"]
    assert (r["video"], r["time"], r["task_type"], r["gt"], r["frames_seen"]) == ("./videos/v1.mp4", 4.0,
                                                                                 "Object Perception", "C", 5)
    assert isinstance(r["answer"], str) and r["protocol"] == "stream" and r["loglik_index"] in range(4)
    result = json.load(open(out / "results.json"))
    assert result["protocol"] == "stream" and result["model"] == os.path.realpath(tiny_model_dir)
    assert set(result["tasks"]) == {"Object Perception", "Causal Reasoning"} and result["total"]["total"] == 4
    assert os.path.exists(out / "results.csv")

    # a rerun asks nothing again; a lost line is asked again (its video replayed only up to that time)
    before = open(out / "predictions.jsonl").read()
    _run(argv)
    assert open(out / "predictions.jsonl").read() == before
    kept = [r for r in lines if r["key"] != "0.1"]
    with open(out / "predictions.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in kept))
    _run(argv)
    again, _ = read_jsonl(out / "predictions.jsonl")
    assert len(again) == 4 and {r["key"]: r["answer"] for r in again} == {r["key"]: r["answer"] for r in lines}

    # score-only reproduces results.json from the prediction file
    _run(["--score", "--benchmark", "streamingbench", "--anno", anno, "--pred-file", str(out / "predictions.jsonl"),
          "--output-dir", str(tmp_path / "scored")])
    rescored = json.load(open(tmp_path / "scored" / "results.json"))
    assert rescored["tasks"] == json.load(open(out / "results.json"))["tasks"]

    # the clip protocol from 0 builds the same memory as the stream did at each question time
    clip_out = tmp_path / "clip"
    _run([*base, "--output-dir", str(clip_out), "--protocol", "clip"])
    clip = {r["key"]: r for r in read_jsonl(clip_out / "predictions.jsonl")[0]}
    assert {k: (r["frames_seen"], r["loglik_index"]) for k, r in clip.items()} == \
        {k: (r["frames_seen"], r["loglik_index"]) for k, r in by_key.items()}
    assert json.load(open(clip_out / "results.json"))["protocol"] == "clip"


def test_cli_ovobench_forward_test_points_context_and_missing_video(tmp_path, tiny_model_dir, make_video):
    video_dir = tmp_path / "OVO-Bench"
    _video(make_video, video_dir / "v0.mp4", 6)
    items = ovobench_items()
    items.append({"id": 9, "task": "STU", "video": "gone.mp4", "realtime": 1.0, "question": "q",
                  "options": ["a", "b"], "gt": 0})
    anno = _write(video_dir / "ovo_bench_new.json", items)
    out = tmp_path / "out"
    _run(["--benchmark", "ovobench", "--anno", anno, "--video-dir", str(video_dir), "--model-path", tiny_model_dir,
          "--output-dir", str(out), "--max-new-tokens", "3", "--device", "cpu", "--protocol", "clip",
          "--context-s", "2"])
    lines = {r["key"]: r for r in read_jsonl(out / "predictions.jsonl")[0]}
    assert len(lines) == 10
    # clip [time - 2, time]: the REC test point at 4 s sees frames 2, 3, 4
    assert (lines["4/1"]["frames_seen"], lines["4/1"]["test_index"], lines["4/1"]["task"]) == (3, 1, "REC")
    assert lines["4/0"]["frames_seen"] == 2 and "loglik_index" not in lines["4/0"]  # REC has no choices
    assert lines["5/1"]["loglik_option"] in ("No", "Yes")
    assert "gone.mp4" in lines["9"]["error"] and "answer" not in lines["9"]
    result = json.load(open(out / "results.json"))
    assert result["tasks"]["STU"]["missing"] == 1 and result["context_s"] == 2.0
    assert set(result["categories"]) == {"Backward Tracing", "Real-Time Visual Perception",
                                         "Forward Active Responding"}


def test_cli_vstream_from_feature_files_writes_the_judge_input(tmp_path, tiny_model_dir):
    import torch

    from flash_vstream.features import save_features

    width = json.load(open(os.path.join(tiny_model_dir, "config.json")))["mm_hidden_size"]
    root = tmp_path / "vstream-realtime"
    save_features(str(root / "ego4d_video_features" / "e0.safetensors"),
                  torch.randn(6, 256, width, generator=torch.Generator().manual_seed(0)), {"fps": 1.0})
    anno = _write(root / "test_qa_ego4d.json", [
        {"video_id": "e0", "question": "what now?", "id": "e0_1", "answer": "yes", "answer_type": "yn",
         "duration": 6, "start_time": 0, "end_time": 4},
        {"video_id": "e0", "question": "what first?", "id": "e0_2", "answer": "red", "answer_type": "color",
         "duration": 6, "start_time": 0, "end_time": 1}])
    out = tmp_path / "out"
    _run(["--benchmark", "vstream", "--anno", anno, "--video-dir", str(root / "ego4d_video_features"),
          "--model-path", tiny_model_dir, "--output-dir", str(out), "--max-new-tokens", "3", "--device", "cpu"])
    lines = read_jsonl(out / "predictions.jsonl")[0]
    assert [(r["key"], r["frames_seen"], r["end_time"]) for r in lines] == [("e0_2", 2, 1), ("e0_1", 5, 4)]
    judge = read_jsonl(out / "judge_input.jsonl")[0]
    assert [(j["id"], j["answer"]) for j in judge] == [("e0_1", "yes"), ("e0_2", "red")]
    assert all(isinstance(j["pred"], str) for j in judge)


def test_synthetic_benchmark_exports_to_streamingbench_and_scores(tmp_path, tiny_model_dir):
    from flash_vstream.demo.synthetic import dataset_paths, generate_dataset

    root = tmp_path / "synthetic"
    generate_dataset(root, num_train_streams=1, num_test_streams=2, stream_length=(12, 14), scene_duration=(3, 5),
                     train_questions_per_stream=1, test_questions_per_stream=3, captions_per_stream=1,
                     min_question_time=4, start_gap=2)
    paths = dataset_paths(root)
    anno = str(root / "streamingbench_synthetic.json")
    n = export_synthetic_streamingbench(paths["test_qa"], anno)
    assert loaders.main(["--synthetic-qa", paths["test_qa"], "--output", str(root / "again.json")]) == 0
    assert open(root / "again.json").read() == open(anno).read()  # seeded: the same file every time
    qa = json.load(open(paths["test_qa"]))
    queries, problems = load_annotations("streamingbench", anno)
    assert problems == [] and len(queries) == n > 0
    by_question = {(q["video"], q["time"], q["question"]): q for q in queries}
    for item in qa:
        q = by_question[(item["video"], float(item["time"]), item["question"])]
        assert q["choices"][q["gt_index"]] == item["answer"] and q["task"] == item["answer_type"]
    out = tmp_path / "out"
    _run(["--benchmark", "streamingbench", "--anno", anno, "--video-dir", str(root), "--model-path", tiny_model_dir,
          "--output-dir", str(out), "--max-new-tokens", "2", "--device", "cpu"])
    result = json.load(open(out / "results.json"))
    assert result["total"]["total"] == n and result["total"]["missing"] == 0
    assert set(result["tasks"]) == {item["answer_type"] for item in qa}
