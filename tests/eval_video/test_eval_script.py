"""The launcher (sharded inference processes, merge, scoring) and scripts/eval.sh, end to end on CPU."""

import json
import os
import subprocess
import sys

from support.fake_openai_server import FakeOpenAIServer, Reply
from flash_vstream.eval_video import inference, run_eval
from flash_vstream.utils.files import read_jsonl

from support import REPO
EVAL_SH = os.path.join(REPO, "scripts", "eval.sh")


def records(path):
    recs, bad = read_jsonl(path)
    assert bad == []
    return recs


def results(path):
    with open(path) as f:
        return json.load(f)


def test_dataset_table_is_the_published_layout():
    expected = {
        "actnet": "eval_video/ActivityNet-QA/video_features eval_video/ActivityNet-QA/test_qa.json",
        "nextoe": "eval_video/nextoe/video_features eval_video/nextoe/test_qa.json",
        "msvd": "eval_video/MSVD-QA/video_features eval_video/MSVD-QA/test_qa.json",
        "msrvtt": "eval_video/MSRVTT-QA/video_features eval_video/MSRVTT-QA/test_qa.json",
        "vsmovienet": "eval_video/vstream/movienet_video_features eval_video/vstream/test_qa_movienet.json",
        "vsego4d": "eval_video/vstream/ego4d_video_features eval_video/vstream/test_qa_ego4d.json",
        "realtime_vsmovienet": "eval_video/vstream-realtime/movienet_video_features "
                               "eval_video/vstream-realtime/test_qa_movienet.json",
        "realtime_vsego4d": "eval_video/vstream-realtime/ego4d_video_features "
                            "eval_video/vstream-realtime/test_qa_ego4d.json",
    }
    got = {name: " ".join(os.path.relpath(p, "data") for p in run_eval.dataset_paths(name, "data"))
           for name in run_eval.DATASETS}
    assert got == expected
    with open(EVAL_SH) as f:
        script = f.read()
    assert " ".join(expected) in script  # eval.sh runs the eight, in the published order


def test_launcher_two_processes_then_exact_scoring(tiny_model_dir, make_qa_tree, tmp_path):
    qa_file, video_dir, items = make_qa_tree(tmp_path / "data")
    items.append({"video_id": "gone", "question": "what?", "id": "gone_5", "answer": "red", "answer_type": 1})
    with open(qa_file, "w") as f:
        json.dump(items, f)
    out = tmp_path / "out"

    def launch(chunks):
        return run_eval.main(["--model-path", tiny_model_dir, "--qa-file", qa_file, "--video-dir", video_dir,
                              "--output-dir", str(out), "--num-chunks", str(chunks), "--judge", "exact",
                              "--max-new-tokens", "3", "--device", "cpu"])

    assert launch(2) == 0
    assert sorted(os.listdir(out / "shards")) == ["2_0.jsonl", "2_1.jsonl"]
    assert sorted(os.listdir(out / "logs")) == ["2_0.log", "2_1.log"]
    preds = records(out / "pred.jsonl")
    assert [r["id"] for r in preds] == [it["id"] for it in items]  # one line per id, QA order
    assert "error" in preds[-1] and "pred" not in preds[-1]
    res = results(out / "exact" / "results.json")
    assert (res["judge_model"], res["total"], res["judged"], res["failed"], res["missing"]) == \
           ("exact_match", 6, 5, 0, 1)
    assert res["yes"] + res["no"] == 5
    assert (out / "exact" / "results.csv").exists()

    # a rerun with one process picks up the two shard files: nothing is answered again
    before = (out / "pred.jsonl").read_text()
    assert launch(1) == 0
    assert (out / "pred.jsonl").read_text() == before
    assert [r.get("error", "") != "" for r in records(out / "shards" / "1_0.jsonl")] == [True]  # only the retry


def test_launcher_with_a_judge_server_and_stale_predictions(tiny_model_dir, make_qa_tree, tmp_path):
    qa_file, video_dir, items = make_qa_tree(tmp_path / "data")
    out = tmp_path / "out"
    os.makedirs(out)
    stale = {**items[0], "key": items[0]["id"], "pred": "from another model", "model": "/elsewhere",
             "fingerprint": "0000"}
    (out / "pred.jsonl").write_text(json.dumps(stale) + "\n")
    argv = ["--model-path", tiny_model_dir, "--qa-file", qa_file, "--video-dir", video_dir, "--output-dir", str(out),
            "--max-new-tokens", "3", "--device", "cpu"]
    assert run_eval.main(argv + ["--judge", "none", "--on-mismatch", "refuse"]) == inference.EXIT_REFUSED

    key = "sk-launcher-secret"
    with FakeOpenAIServer(lambda req: Reply.text("{'pred': 'yes', 'score': 4}")) as srv:
        rc = run_eval.main(argv + ["--judge", "gpt", "--judge-base-url", srv.base_url, "--api-key", key,
                                   "--judge-model", "local-judge"])
    assert rc == 0
    assert len(srv.requests) == len(items)
    res = results(out / "judge" / "results.json")
    assert (res["judge_model"], res["total"], res["judged"], res["accuracy"], res["score"]) == \
           ("local-judge", 5, 5, 1.0, 4.0)
    preds = records(out / "pred.jsonl")
    assert len(preds) == 5 and all(r["pred"] != "from another model" for r in preds)  # not mixed in
    assert any(name.startswith("pred.jsonl.stale-") for name in os.listdir(out))
    for folder, _, files in os.walk(out):
        for name in files:
            with open(os.path.join(folder, name), errors="replace") as f:
                assert key not in f.read()


def test_launcher_skips_absent_dataset(tmp_path, tiny_model_dir):
    argv = ["--dataset", "msvd", "--data-root", str(tmp_path), "--model-path", tiny_model_dir]
    assert run_eval.main(argv + ["--skip-absent"]) == run_eval.EXIT_SKIPPED
    assert run_eval.main(argv) == run_eval.EXIT_FAILED


def run_eval_sh(env_extra, timeout=180):
    env = {**os.environ, "PYTHON": sys.executable, "JUDGE": "exact", "MAX_NEW_TOKENS": "3", "DEVICE": "cpu",
           **env_extra}
    env.pop("OPENAI_API_KEY", None)  # exact needs no key
    return subprocess.run(["bash", EVAL_SH], env=env, capture_output=True, text=True, timeout=timeout)


def test_eval_sh_is_valid_bash():
    assert subprocess.run(["bash", "-n", EVAL_SH]).returncode == 0


def test_eval_sh_runs_present_datasets_and_skips_the_rest(tiny_model_dir, make_qa_tree, tmp_path):
    data = tmp_path / "data"
    make_qa_tree(data / "eval_video" / "MSVD-QA")
    out = tmp_path / "evaluation"
    proc = run_eval_sh({"MODEL_PATH": tiny_model_dir, "DATA_ROOT": str(data), "OUTPUT_ROOT": str(out)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("actnet", "nextoe", "msrvtt", "vsmovienet", "vsego4d", "realtime_vsmovienet", "realtime_vsego4d"):
        assert f"skip: {name}:" in proc.stderr
    table = proc.stdout[proc.stdout.index("=== all datasets"):]
    row = next(line for line in table.splitlines() if line.startswith("msvd "))
    assert row.split()[1:] == ["exact_match", row.split()[2], "-", "5", "5", "0", "0"]
    assert len(records(out / "msvd" / "pred.jsonl")) == 5
    assert results(out / "msvd" / "exact" / "results.json")["total"] == 5
    assert (out / "results_exact.csv").read_text().splitlines()[1].startswith("msvd,exact_match,")


def test_eval_sh_fails_when_a_present_dataset_fails(tiny_model_dir, tmp_path):
    folder = tmp_path / "data" / "eval_video" / "nextoe"
    os.makedirs(folder / "video_features")
    (folder / "test_qa.json").write_text("[{\"video_id\": ")  # broken QA file
    proc = run_eval_sh({"MODEL_PATH": tiny_model_dir, "DATA_ROOT": str(tmp_path / "data"),
                        "OUTPUT_ROOT": str(tmp_path / "evaluation"), "DATASETS": "nextoe msvd"})
    assert proc.returncode != 0
    assert "error: nextoe failed" in proc.stderr and "skip: msvd:" in proc.stderr


def test_eval_sh_without_any_dataset_says_so(tiny_model_dir, tmp_path):
    proc = run_eval_sh({"MODEL_PATH": tiny_model_dir, "DATA_ROOT": str(tmp_path), "OUTPUT_ROOT": str(tmp_path / "o")})
    assert proc.returncode == 1 and "no benchmark found" in proc.stderr
