"""The inference driver on a tiny random model: one line per id, greedy, errors per item, resume, shards."""

import json
import os

import numpy as np
import pytest

from flash_vstream.conversation import build_prompt
from flash_vstream.eval_video import inference, run_eval
from flash_vstream.utils.files import read_jsonl

REQUIRED = {"id", "question", "answer", "answer_type", "pred", "model", "generation", "memory_tokens", "frames"}


def infer(model_dir, qa_file, video_dir, out, *extra):
    return inference.main(["--model-path", model_dir, "--qa-file", qa_file, "--video-dir", video_dir,
                           "--output-file", str(out), "--max-new-tokens", "4", "--device", "cpu", *map(str, extra)])


def lines(path):
    records, bad = read_jsonl(path)
    assert bad == []
    return records


def preds(path):
    return {r["id"]: r.get("pred") for r in lines(path)}


def test_shards_are_contiguous_and_balanced():
    # the one sharding rule (flash_vstream.utils.sharding), shared with feature extraction;
    # it replaced this driver's ceil split ([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]] here)
    items = list(range(10))
    chunks = [inference.shard(items, 4, i) for i in range(4)]
    assert chunks == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    assert [inference.shard(items[:2], 3, i) for i in range(3)] == [[], [0], [1]]


def test_one_line_per_id_with_required_keys(tiny_model_dir, make_qa_tree, tmp_path, capsys):
    qa_file, video_dir, items = make_qa_tree(tmp_path)
    out = tmp_path / "pred.jsonl"
    assert infer(tiny_model_dir, qa_file, video_dir, out) == 0
    records = lines(out)
    assert [r["id"] for r in records] == [it["id"] for it in items]
    for r, item in zip(records, items):
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert isinstance(r["pred"], str) and "error" not in r
        assert r["question"] == item["question"] and r["answer"] == item["answer"]
        assert r["model"] == os.path.realpath(tiny_model_dir)
        assert r["generation"]["do_sample"] is False and r["generation"]["max_new_tokens"] == 4
        assert r["memory_tokens"] > 0
    # each line read its own video (3, 5, 7 frames); the item with time=1 sees frames 0 and 1 only
    assert [r["frames"] for r in records] == [3, 5, 7, 2, 5]
    assert "5 answered now, 0 error(s)" in capsys.readouterr().out


def test_greedy_is_deterministic_and_batching_changes_nothing(tiny_model_dir, make_qa_tree, tmp_path):
    qa_file, video_dir, _ = make_qa_tree(tmp_path)
    runs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"]
    infer(tiny_model_dir, qa_file, video_dir, runs[0])
    infer(tiny_model_dir, qa_file, video_dir, runs[1])
    infer(tiny_model_dir, qa_file, video_dir, runs[2], "--batch-size", 3)  # left-padded batches of 3 and 2
    assert preds(runs[0]) == preds(runs[1]) == preds(runs[2])
    assert all(p for p in preds(runs[0]).values())


def test_missing_and_corrupt_features_are_errors_for_their_items_only(tiny_model_dir, make_qa_tree, tmp_path, capsys):
    qa_file, video_dir, items = make_qa_tree(tmp_path)
    extra = [{"video_id": "gone", "question": "what colour?", "id": "gone_0", "answer": "red", "answer_type": 0},
             {"video_id": "broken", "question": "what colour?", "id": "broken_0", "answer": "red", "answer_type": 0}]
    with open(qa_file, "w") as f:
        json.dump(items[:2] + extra + items[2:], f)
    with open(os.path.join(video_dir, "v2.safetensors"), "rb") as f:
        head = f.read(300)
    with open(os.path.join(video_dir, "broken.safetensors"), "wb") as f:
        f.write(head)  # a truncated copy of a real feature file
    out = tmp_path / "pred.jsonl"
    assert infer(tiny_model_dir, qa_file, video_dir, out, "--batch-size", 2) == 0  # the run goes on, exit 0
    captured = capsys.readouterr()
    assert "2 error(s)" in captured.out
    by_id = {r["id"]: r for r in lines(out)}
    assert len(by_id) == 7
    for bad in ("gone_0", "broken_0"):
        assert "pred" not in by_id[bad] and "frames" not in by_id[bad]  # never answered from another video
        assert f"{bad.split('_')[0]}.safetensors" in by_id[bad]["error"]
        assert {"id", "question", "answer", "answer_type", "error"} <= set(by_id[bad])
    assert "not found" in by_id["gone_0"]["error"]
    assert [by_id[it["id"]]["frames"] for it in items] == [3, 5, 7, 2, 5]
    # --fail-on-error turns the same outcome into a failing exit code; the retry is an error again
    assert infer(tiny_model_dir, qa_file, video_dir, out, "--fail-on-error") == inference.EXIT_ITEM_ERRORS
    assert sorted(r["id"] for r in lines(out)) == sorted(by_id)  # still one line per id


def test_killed_run_resumes_with_one_line_per_id(tiny_model_dir, make_qa_tree, tmp_path, capsys):
    qa_file, video_dir, items = make_qa_tree(tmp_path)
    full = tmp_path / "full.jsonl"
    infer(tiny_model_dir, qa_file, video_dir, full)
    out = tmp_path / "pred.jsonl"
    infer(tiny_model_dir, qa_file, video_dir, out, "--limit", 3)  # "killed" after three items ...
    with open(out) as f:
        kept = f.readlines()
    with open(out, "w") as f:
        f.writelines(kept[:2])
        f.write(kept[2][:40])  # ... in the middle of writing the third line
    capsys.readouterr()
    assert infer(tiny_model_dir, qa_file, video_dir, out) == 0
    assert "2 already answered, 3 answered now" in capsys.readouterr().out
    records = lines(out)
    assert sorted(r["id"] for r in records) == sorted(it["id"] for it in items)
    with open(out) as f:
        assert f.readlines()[:2] == kept[:2]  # finished lines are kept as they were, not re-answered
    assert preds(out) == preds(full)
    # a rerun with everything answered changes nothing
    before = out.read_bytes()
    assert infer(tiny_model_dir, qa_file, video_dir, out) == 0
    assert out.read_bytes() == before


def test_another_models_lines_are_not_mixed(tiny_model_dir, make_qa_tree, tmp_path, capsys):
    qa_file, video_dir, items = make_qa_tree(tmp_path)
    out = tmp_path / "pred.jsonl"
    infer(tiny_model_dir, qa_file, video_dir, out, "--limit", 2)
    old = out.read_bytes()
    # other generation settings: refused, file untouched
    argv = ["--model-path", tiny_model_dir, "--qa-file", qa_file, "--video-dir", video_dir, "--output-file", str(out),
            "--max-new-tokens", "3", "--device", "cpu"]
    assert inference.main(argv + ["--on-mismatch", "refuse"]) == inference.EXIT_REFUSED
    assert "max_new_tokens 4 vs 3" in capsys.readouterr().err
    assert out.read_bytes() == old
    # fresh: the old file is set aside and every item is answered by the new setup
    assert inference.main(argv) == 0
    records = lines(out)
    assert len(records) == len(items)
    assert {r["generation"]["max_new_tokens"] for r in records} == {3}
    assert len({r["fingerprint"] for r in records}) == 1
    aside = [p for p in os.listdir(tmp_path) if p.startswith("pred.jsonl.stale-")]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_bytes() == old


def test_two_shards_merged_equal_one_run(tiny_model_dir, make_qa_tree, tmp_path):
    qa_file, video_dir, items = make_qa_tree(tmp_path)
    one = tmp_path / "one.jsonl"
    infer(tiny_model_dir, qa_file, video_dir, one)
    shards = [tmp_path / f"2_{i}.jsonl" for i in range(2)]
    for i, path in enumerate(shards):
        infer(tiny_model_dir, qa_file, video_dir, path, "--num-chunks", 2, "--chunk-idx", i)
    assert [r["id"] for r in lines(shards[0])] == [it["id"] for it in items[:2]]  # contiguous, 5 * 1 // 2
    merged = tmp_path / "merged.jsonl"
    fingerprint = lines(one)[0]["fingerprint"]
    counts = run_eval.merge_predictions(qa_file, [str(p) for p in shards], fingerprint, str(merged))
    assert counts == {"total": 5, "answered": 5, "errors": 0, "missing": 0}
    assert merged.read_text() == one.read_text()


def test_merge_prefers_answers_and_drops_other_runs(tmp_path, make_qa_tree):
    qa_file, _, items = make_qa_tree(tmp_path)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    base = {"answer": "x", "answer_type": 0, "question": "q"}
    a.write_text("".join(json.dumps(r) + "\n" for r in [
        {**base, "id": "v0_0", "key": "v0_0", "fingerprint": "F", "error": "FeatureLoadError: gone"},
        {**base, "id": "v1_1", "key": "v1_1", "fingerprint": "OTHER", "pred": "stale"},
    ]))
    b.write_text("".join(json.dumps(r) + "\n" for r in [
        {**base, "id": "v0_0", "key": "v0_0", "fingerprint": "F", "pred": "red"},
        {**base, "id": "v2_2", "key": "v2_2", "fingerprint": "F", "error": "FeatureLoadError: bad"},
    ]) + '{"id": "v1_4", "tru')
    out = tmp_path / "pred.jsonl"
    counts = run_eval.merge_predictions(qa_file, [str(a), str(b)], "F", str(out))
    assert counts == {"total": 5, "answered": 1, "errors": 1, "missing": 3}
    assert [(r["id"], r.get("pred"), bool(r.get("error"))) for r in lines(out)] == [
        ("v0_0", "red", False), ("v2_2", None, True)]


def test_raw_video_items_are_decoded_and_cut_at_time(tiny_model_dir, tmp_path):
    from flash_vstream.demo.synthetic import write_mp4

    rng = np.random.default_rng(0)
    video_dir = tmp_path / "videos"
    write_mp4(rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), video_dir / "clip.mp4", fps=1)
    write_mp4(rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8), video_dir / "sub" / "other.mp4", fps=1)
    items = [
        {"video_id": "clip", "question": "describe the video.", "id": "r0", "answer": "red", "answer_type": 0},
        {"video_id": "clip", "question": "what colour?", "id": "r1", "answer": "red", "answer_type": 0, "time": 2},
        {"video_id": "x", "video": "sub/other.mp4", "question": "what?", "id": "r2", "answer": "a", "answer_type": 0},
        {"video_id": "nowhere", "question": "what?", "id": "r3", "answer": "a", "answer_type": 0},
    ]
    qa_file = tmp_path / "qa.json"
    qa_file.write_text(json.dumps(items))
    out = tmp_path / "pred.jsonl"
    assert infer(tiny_model_dir, str(qa_file), str(video_dir), out, "--raw-video") == 0
    by_id = {r["id"]: r for r in lines(out)}
    assert [by_id[i].get("frames") for i in ("r0", "r1", "r2")] == [4, 3, 3]
    assert all(isinstance(by_id[i]["pred"], str) for i in ("r0", "r1", "r2"))
    assert by_id["r0"]["generation"]["inputs"] == "video"
    assert "no video file" in by_id["r3"]["error"] and "pred" not in by_id["r3"]


def test_items_with_options_are_answered_by_likelihood(tiny_model_dir, make_qa_tree, tmp_path):
    options = ["a red circle", "a blue square", "a green triangle"]
    items = [{"video_id": "v1", "question": "which shape appears?", "id": "m0", "answer": "B", "answer_type": "mc",
              "options": options}]
    qa_file, video_dir, _ = make_qa_tree(tmp_path, items=items)
    out = tmp_path / "pred.jsonl"
    assert infer(tiny_model_dir, qa_file, video_dir, out) == 0
    (r,) = lines(out)
    assert r["pred_index"] in range(3) and r["pred"] == options[r["pred_index"]]
    assert r["finish_reason"] == "option"


def test_prompt_is_vicuna_v1_with_one_image_placeholder():
    prompt = build_prompt("is it red?")
    assert prompt.endswith("USER: <image>\nis it red? ASSISTANT:")
    assert prompt.count("<image>") == 1
    assert build_prompt("q", system="Be brief.").startswith("Be brief. USER: <image>\nq")


def test_prompt_options_and_history():
    # the one prompt builder (conversation.build_prompt) that inference, the session and the benchmarks use
    assert build_prompt("which?", options=["a cat", "a dog"]).endswith(
        "USER: <image>\nwhich?\nOptions:\n(A) a cat\n(B) a dog ASSISTANT:")
    prompt = build_prompt("and now?", history=[("what colour?", "red")])
    assert prompt.endswith("USER: <image>\nwhat colour? ASSISTANT: red</s>USER: and now? ASSISTANT:")
    assert prompt.startswith(build_prompt("")[:build_prompt("").index("<image>") + len("<image>")])


def test_decode_cuts_at_the_stop(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("red circle", add_special_tokens=False)["input_ids"]
    assert inference.decode_answer(tok, ids + [tok.eos_token_id, *ids]) == ("red circle", "stop")
    assert inference.decode_answer(tok, ids) == ("red circle", "length")


@pytest.mark.parametrize("flag", ["--output-file", "--chunk-idx", "--resume-from"])
def test_launcher_rejects_per_process_flags(flag, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_eval.main(["--qa-file", "q", "--video-dir", "d", "--output-dir", "o", "--model-path", "m", flag, "x"])
    assert f"{flag} is set by the launcher" in capsys.readouterr().err


def test_last_frames_ablation_keeps_the_size_but_only_the_newest_frames(tmp_path):
    import types

    import torch

    from flash_vstream.eval_video.inference import InputLoader
    from flash_vstream.features import save_features

    feature = torch.arange(5, dtype=torch.float32)[:, None, None].expand(5, 256, 8).contiguous()  # frame k = k
    save_features(str(tmp_path / "v.safetensors"), feature, {"fps": 1})
    model = types.SimpleNamespace(config=types.SimpleNamespace(mm_hidden_size=8, video_fps=1.0),
                                  device=torch.device("cpu"))
    item = {"video_id": "v", "time": 3}
    full = InputLoader(model, str(tmp_path))(item)
    assert full[:, 0, 0].tolist() == [0, 1, 2, 3]  # cut at the question time
    one = InputLoader(model, str(tmp_path), last_frames=1)(item)
    assert one[:, 0, 0].tolist() == [3, 3, 3, 3]
    two = InputLoader(model, str(tmp_path), last_frames=2)(item)
    assert two[:, 0, 0].tolist() == [2, 3, 2, 3]
