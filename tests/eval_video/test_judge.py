"""The judge against a scripted OpenAI-compatible server on 127.0.0.1, through the real openai client."""

import json
import os
import re
import subprocess
import sys

import pytest

from support.fake_openai_server import FakeOpenAIServer, Reply
from flash_vstream.eval_video import aggregate, judge
from flash_vstream.eval_video.judge import RetryPolicy, VerdictParseError, parse_verdict

from support import REPO
FAST = ["--backoff-base", "0.01", "--max-backoff", "0.05"]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def tag(req):
    """The #n# tag the tests put into each prediction text."""
    m = re.search(r"#(\w+)#", req.user)
    return m.group(1) if m else None


def run(pred_file, out_dir, srv, *extra, key="sk-test"):
    argv = ["--pred-file", str(pred_file), "--output-dir", str(out_dir), "--judge-base-url", srv.base_url,
            "--api-key", key, "--num-workers", "4", *FAST, *extra]
    return judge.main(argv)


# ---------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, expected", [
    ("{'pred': 'yes', 'score': 4}", ("yes", 4)),
    ('{"pred": "no", "score": 0}', ("no", 0)),
    ("```json\n{\"pred\": \"yes\", \"score\": 5}\n```", ("yes", 5)),
    ("```\n{'pred': 'no', 'score': 1}\n```", ("no", 1)),
    ("Sure! Here is my evaluation: {'pred': 'yes', 'score': 3}. Hope it helps.", ("yes", 3)),
    ("{'pred': 'Yes', 'score': '4'}", ("yes", 4)),
    ("{'pred': 'YES', 'score': 4.0}", ("yes", 4)),
    ("{'pred': 'no', 'score': 4.8}", ("no", 5)),     # rounded, not truncated
    ("{'pred': 'no', 'score': 2.5}", ("no", 3)),     # half up
    ("{'pred': 'yes', 'score': 0.4}", ("yes", 0)),
    ("{'Pred': 'yes.', 'Score': 2}", ("yes", 2)),
    ("{pred: yes, score: 4}", ("yes", 4)),
    ('{"pred": true, "score": 5}', ("yes", 5)),
    ("pred: no\nscore: 1", ("no", 1)),
])
def test_parse_verdict_accepts(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize("text", [
    "", None, "I think the answer is right.", "{'pred': 'maybe', 'score': 3}",
    "{'pred': 'yes', 'score': 7}", "{'pred': 'yes', 'score': -1}", "{'pred': 'yes', 'score': 5.2}",
    "{'pred': 'yes'}", "{'pred': 'yes', 'score': 'high'}", "{'pred': 'yes', 'score': True}",
    "{'pred': 'yes', 'score': float('nan')}",
])
def test_parse_verdict_rejects(text):
    with pytest.raises(VerdictParseError):
        parse_verdict(text)


def test_backoff_is_exponential_capped_with_small_jitter():
    p = RetryPolicy(max_retries=5, base=0.5, max_delay=3.0)
    for retry, expected in enumerate([0.5, 1.0, 2.0, 3.0, 3.0]):
        d = p.delay(retry)
        assert expected <= d <= expected * 1.1
    assert 2.0 <= p.delay(0, retry_after=2.0) <= 3.0   # Retry-After honoured
    assert p.delay(0, retry_after=100) <= 3.0 * 1.1 + 3.0


def test_prompt_asks_for_the_video_chatgpt_dict():
    system, user = judge.build_messages("what is he doing?", "running", "jogging")
    assert system["role"] == "system" and "synonym" in system["content"].lower()
    assert "Question: what is he doing?" in user["content"]
    assert "Correct answer: running" in user["content"] and "Predicted answer: jogging" in user["content"]
    assert "'pred'" in user["content"] and "'score'" in user["content"] and "integer" in user["content"]


# ---------------------------------------------------------------- full runs

PREDS = [
    # id, type, reply -> verdict
    {"id": "v0", "answer_type": "CW", "reply": "{'pred': 'yes', 'score': 5}"},
    {"id": "v1", "answer_type": "CW", "reply": '```json\n{"pred": "no", "score": 1}\n```'},
    {"id": "v2", "answer_type": "CH", "reply": "Evaluation: {'pred': 'Yes', 'score': '4'} -- done"},
    {"id": "v3", "answer_type": "TN", "reply": '{"pred": "no", "score": 2.0}'},
    {"id": "v4", "answer_type": "TN", "reply": "{'pred': 'yes', 'score': 4.6}"},   # -> 5
    {"id": "v5", "answer_type": "DC", "reply": "{'pred': 'no', 'score': 0}"},
    {"id": "v5", "answer_type": "DC", "reply": "{'pred': 'yes', 'score': 3}"},       # duplicate id -> v5_1
]


def make_preds(tmp_path, specs=PREDS, error_ids=("v9",)):
    recs = [{"id": s["id"], "question": f"question {i}?", "answer": f"answer {i}", "answer_type": s["answer_type"],
             "pred": f"prediction #{i}#", "model": "tiny"} for i, s in enumerate(specs)]
    recs += [{"id": e, "question": "q?", "answer": "a", "answer_type": "DO", "error": "feature file not found"}
             for e in error_ids]
    path = tmp_path / "preds.jsonl"
    write_jsonl(path, recs)
    return path


def replies_by_tag(specs=PREDS):
    return {str(i): s["reply"] for i, s in enumerate(specs)}


def test_verdicts_aggregate_to_exact_numbers(tmp_path, capsys):
    pred_file = make_preds(tmp_path)
    replies = replies_by_tag()
    out = tmp_path / "out"
    with FakeOpenAIServer(lambda req: Reply.text(replies[tag(req)])) as srv:
        assert run(pred_file, out, srv, "--judge-model", "judge-x") == 0
    # one request per predicted item, temperature 0, pinned model, the system prompt
    assert len(srv.requests) == 7
    assert all(r.body["temperature"] == 0 and r.body["model"] == "judge-x" for r in srv.requests)
    assert all(r.body["messages"][0]["role"] == "system" for r in srv.requests)

    res = json.load(open(out / "results.json"))
    # verdicts: yes no yes no yes no yes ; scores 5 1 4 2 5 0 3
    assert res["judge_model"] == "judge-x"
    assert (res["total"], res["judged"], res["failed"], res["missing"]) == (8, 7, 0, 1)
    assert (res["yes"], res["no"]) == (4, 3)
    assert res["accuracy"] == pytest.approx(4 / 7)
    assert res["score"] == pytest.approx(20 / 7)
    assert res["missing_keys"] == ["v9"] and res["failed_keys"] == []
    bt = res["by_type"]
    assert bt["CW"]["accuracy"] == 0.5 and bt["CW"]["score"] == 3.0 and bt["CW"]["judged"] == 2
    assert bt["CH"]["accuracy"] == 1.0 and bt["CH"]["score"] == 4.0
    assert bt["TN"]["accuracy"] == 0.5 and bt["TN"]["score"] == 3.5
    assert bt["DC"]["accuracy"] == 0.5 and bt["DC"]["score"] == 1.5
    assert bt["DO"]["accuracy"] is None and bt["DO"]["missing"] == 1 and bt["DO"]["total"] == 1
    bp = res["by_type_prefix"]   # NExT-QA style types: also by first letter
    assert bp["C"]["accuracy"] == pytest.approx(2 / 3) and bp["C"]["score"] == pytest.approx(10 / 3)
    assert bp["T"]["accuracy"] == 0.5 and bp["D"]["accuracy"] == 0.5 and bp["D"]["total"] == 3
    assert res["score_histogram"] == {"yes": [0, 0, 0, 1, 1, 2], "no": [1, 1, 1, 0, 0, 0]}
    assert res["pred_models"] == ["tiny"] and len(res["pred_file_sha256"]) == 64

    lines = read_lines(out / "judgements.jsonl")
    assert sorted(r["key"] for r in lines) == ["v0", "v1", "v2", "v3", "v4", "v5", "v5_1"]
    by_key = {r["key"]: r for r in lines}
    assert by_key["v2"]["raw"] == replies["2"] and by_key["v2"]["verdict"] == "yes"
    assert by_key["v5_1"]["prediction"]["pred"] == "prediction #6#" and by_key["v5_1"]["id"] == "v5"
    assert all(r["judge_model"] == "judge-x" and r["status"] == "ok" for r in lines)

    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0].split(",")[:4] == ["level", "group", "accuracy", "score"]
    assert csv_rows[1].startswith("all,all,0.571") and any(r.startswith("prefix,C,") for r in csv_rows)
    table = capsys.readouterr().out
    assert "judge-x" in table and "57.14" in table and "2.857" in table


def test_rate_limits_server_errors_and_timeouts_are_retried(tmp_path):
    specs = [{"id": f"r{i}", "answer_type": "open", "reply": "{'pred': 'yes', 'score': 4}"} for i in range(6)]
    pred_file = make_preds(tmp_path, specs, error_ids=())
    trouble = {
        "0": [Reply.error(429, "slow down", headers={"retry-after": "0.01"}), Reply.error(429)],
        "1": [Reply.error(500), Reply.error(503)],
        "2": [Reply.hang(2.0)],                 # longer than --timeout
        "3": [Reply.dropped()],                 # connection closed without an answer
        "4": [Reply.text("not a verdict")],     # malformed, then fine
    }

    def script(req):
        t = tag(req)
        errors = trouble.get(t, [])
        return errors[req.attempt] if req.attempt < len(errors) else Reply.text("{'pred': 'yes', 'score': 4}")

    out = tmp_path / "out"
    with FakeOpenAIServer(script) as srv:
        assert run(pred_file, out, srv, "--timeout", "0.5", "--max-retries", "3") == 0
    res = json.load(open(out / "results.json"))
    assert (res["judged"], res["failed"], res["accuracy"], res["score"]) == (6, 0, 1.0, 4.0)
    attempts = {r["key"]: r["attempts"] for r in read_lines(out / "judgements.jsonl")}
    assert attempts == {"r0": 3, "r1": 3, "r2": 2, "r3": 2, "r4": 2, "r5": 1}


def test_malformed_and_rejected_requests_fail_with_raw_text_then_rerun_fixes(tmp_path, capsys):
    specs = [{"id": f"m{i}", "answer_type": "open", "reply": ""} for i in range(4)]
    pred_file = make_preds(tmp_path, specs, error_ids=())
    broken = {"0": Reply.text("The prediction is quite good."),      # never a dict
              "1": Reply.text("{'pred': 'yes', 'score': 7}"),         # score out of range
              "2": Reply.error(400, "bad request")}                    # not retryable

    def script(req):
        return broken.get(tag(req), Reply.text("{'pred': 'no', 'score': 1}"))

    out = tmp_path / "out"
    with FakeOpenAIServer(script) as srv:
        assert run(pred_file, out, srv, "--max-retries", "2") == judge.EXIT_FAILED
    per_tag = {t: sum(tag(r) == t for r in srv.requests) for t in "0123"}
    assert per_tag == {"0": 3, "1": 3, "2": 1, "3": 1}
    res = json.load(open(out / "results.json"))
    assert (res["total"], res["judged"], res["failed"], res["missing"]) == (4, 1, 3, 0)
    assert res["accuracy"] == 0.0 and res["failed_keys"] == ["m0", "m1", "m2"]
    lines = {r["key"]: r for r in read_lines(out / "judgements.jsonl")}
    assert lines["m0"]["status"] == "failed" and lines["m0"]["raw"] == "The prediction is quite good."
    assert "unparseable" in lines["m0"]["error"]
    assert lines["m1"]["raw"] == "{'pred': 'yes', 'score': 7}" and "outside" in lines["m1"]["error"]
    assert lines["m2"]["raw"] is None and "400" in lines["m2"]["error"] and lines["m2"]["attempts"] == 1

    # the server recovers: a rerun asks only for the three failed items, one record per key after
    with FakeOpenAIServer(lambda req: Reply.text("{'pred': 'yes', 'score': 5}")) as srv:
        assert run(pred_file, out, srv) == 0
    assert sorted(tag(r) for r in srv.requests) == ["0", "1", "2"]
    lines = read_lines(out / "judgements.jsonl")
    assert sorted(r["key"] for r in lines) == ["m0", "m1", "m2", "m3"]
    assert all(r["status"] == "ok" for r in lines)
    res = json.load(open(out / "results.json"))
    assert (res["judged"], res["failed"], res["accuracy"], res["score"]) == (4, 0, 0.75, 4.0)


def test_killed_run_resumes_with_one_record_per_id(tmp_path):
    specs = [{"id": f"k{i}", "answer_type": "open", "reply": ""} for i in range(8)]
    full = make_preds(tmp_path, specs, error_ids=())
    answer = lambda req: Reply.text("{'pred': '%s', 'score': %d}" % ("yes" if int(tag(req)) % 2 else "no", int(tag(req)) % 6))
    out = tmp_path / "out"
    # a first run sees only the first 5 predictions (inference was still going)
    part = tmp_path / "part.jsonl"
    part.write_text("".join(full.read_text().splitlines(keepends=True)[:5]))
    with FakeOpenAIServer(answer) as srv:
        assert run(part, out, srv) == 0
        assert len(srv.requests) == 5
        # the full file: only the 3 new predictions are judged
        assert run(full, out, srv) == 0
        assert len(srv.requests) == 8
    expected = json.load(open(out / "results.json"))
    assert expected["judged"] == 8 and expected["accuracy"] == 0.5

    # a kill mid-write: the last line is cut in half, and the line before it is gone
    path = out / "judgements.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    cut = [json.loads(lines[-1])["key"], json.loads(lines[-2])["key"]]
    path.write_text("".join(lines[:-2]) + lines[-1][: len(lines[-1]) // 2])
    with FakeOpenAIServer(answer) as srv:
        assert run(full, out, srv) == 0
    assert sorted(f"k{tag(r)}" for r in srv.requests) == sorted(cut)
    keys = [r["key"] for r in read_lines(path)]
    assert sorted(keys) == [f"k{i}" for i in range(8)]
    res = json.load(open(out / "results.json"))
    for k in ("accuracy", "score", "total", "judged", "failed", "by_type"):
        assert res[k] == expected[k]


def test_verdicts_of_another_judge_or_prediction_file_are_not_mixed_in(tmp_path, capsys):
    specs = [{"id": f"s{i}", "answer_type": "open", "reply": ""} for i in range(3)]
    pred_file = make_preds(tmp_path, specs, error_ids=())
    out = tmp_path / "out"
    with FakeOpenAIServer(lambda req: Reply.text("{'pred': 'yes', 'score': 5}")) as srv:
        assert run(pred_file, out, srv, "--judge-model", "judge-a") == 0
        before = (out / "judgements.jsonl").read_text()
        # another judge model: refused, file untouched
        assert run(pred_file, out, srv, "--judge-model", "judge-b", "--on-mismatch", "refuse") == judge.EXIT_REFUSED
        assert "judge-a" in capsys.readouterr().err
        assert (out / "judgements.jsonl").read_text() == before
        # default: the old file is moved aside and everything is judged afresh
        assert run(pred_file, out, srv, "--judge-model", "judge-b") == 0
        assert len(srv.requests) == 6
        lines = read_lines(out / "judgements.jsonl")
        assert len(lines) == 3 and {r["judge_model"] for r in lines} == {"judge-b"}
        assert [p for p in os.listdir(out) if p.startswith("judgements.jsonl.stale-")]
        # another prediction file (a different model's answers) in the same folder: fresh again
        recs = [json.loads(line) for line in pred_file.read_text().splitlines()]
        recs[1]["pred"] = "another model's answer #1#"
        write_jsonl(pred_file, recs)
        assert run(pred_file, out, srv, "--judge-model", "judge-b") == 0
        assert len(srv.requests) == 9
    assert "moved it to" in capsys.readouterr().err
    lines = read_lines(out / "judgements.jsonl")
    assert len(lines) == 3 and lines[0]["judge_model"] == "judge-b"
    assert {r["prediction"]["pred"] for r in lines} >= {"another model's answer #1#"}


def test_missing_predictions_keep_the_denominator_honest(tmp_path, capsys):
    specs = [{"id": f"q{i}", "answer_type": "open", "reply": ""} for i in range(3)]
    pred_file = make_preds(tmp_path, specs, error_ids=("q3",))
    qa = [{"id": f"q{i}", "video_id": f"v{i}", "question": "?", "answer": "a", "answer_type": "open"} for i in range(5)]
    qa_file = tmp_path / "test_qa.json"
    qa_file.write_text(json.dumps(qa))
    with open(pred_file, "a") as f:   # inference was killed while writing q4's line
        f.write('{"id": "q4", "question": "?", "ans')
    out = tmp_path / "out"
    with FakeOpenAIServer(lambda req: Reply.text("{'pred': 'yes', 'score': 3}")) as srv:
        assert run(pred_file, out, srv, "--qa-file", str(qa_file)) == 0
    assert "unreadable" in capsys.readouterr().err
    res = json.load(open(out / "results.json"))
    assert (res["total"], res["judged"], res["failed"], res["missing"]) == (5, 3, 0, 2)
    assert res["missing_keys"] == ["q3", "q4"] and res["accuracy"] == 1.0
    assert "by_type_prefix" not in res


def test_azure_client_path_and_key_header(tmp_path):
    specs = [{"id": "a0", "answer_type": "open", "reply": ""}]
    pred_file = make_preds(tmp_path, specs, error_ids=())
    out = tmp_path / "out"
    with FakeOpenAIServer(lambda req: Reply.text("{'pred': 'no', 'score': 2}")) as srv:
        rc = judge.main(["--pred-file", str(pred_file), "--output-dir", str(out), "--judge-model", "my-deployment",
                         "--azure-endpoint", srv.root_url, "--api-version", "2024-06-01", "--api-key", "az-key-123"])
    assert rc == 0
    req = srv.requests[0]
    assert req.path.startswith("/openai/deployments/my-deployment/chat/completions")
    assert "api-version=2024-06-01" in req.path and req.headers["api-key"] == "az-key-123"
    assert "az-key-123" not in (out / "results.json").read_text() + (out / "judgements.jsonl").read_text()


def test_api_key_never_printed_or_written(tmp_path):
    """The server echoes the key back in an error body and inside a reply; none of it leaks."""
    secret = "sk-very-secret-0123456789"
    specs = [{"id": f"x{i}", "answer_type": "open", "reply": ""} for i in range(3)]
    pred_file = make_preds(tmp_path, specs, error_ids=())

    def script(req):
        auth = req.headers.get("authorization", "")
        if tag(req) == "0":
            return Reply.error(401, f"Incorrect API key provided: {auth}")
        if tag(req) == "1":
            return Reply.text(f"{{'pred': 'yes', 'score': 5}} (authenticated as {auth})")
        return Reply.text(f"garbage {auth}")

    out = tmp_path / "out"
    with FakeOpenAIServer(script) as srv:
        env = {**os.environ, "OPENAI_API_KEY": secret, "PYTHONPATH": REPO}
        proc = subprocess.run(
            [sys.executable, "-m", "flash_vstream.eval_video.judge", "--pred-file", str(pred_file),
             "--output-dir", str(out), "--judge-base-url", srv.base_url, "--max-retries", "1", *FAST],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert srv.requests[0].headers["authorization"] == f"Bearer {secret}"   # the key was really used
    assert proc.returncode == judge.EXIT_FAILED, proc.stderr
    assert secret not in proc.stdout + proc.stderr
    for name in os.listdir(out):
        assert secret not in (out / name).read_text(), name
    lines = {r["key"]: r for r in read_lines(out / "judgements.jsonl")}
    assert "***" in lines["x1"]["raw"] and "***" in lines["x0"]["error"]


def test_aggregate_cli_prints_one_table_across_datasets(tmp_path, capsys):
    items = aggregate.assign_keys([{"id": i, "answer_type": "t", "pred": "p"} for i in range(4)])
    verdicts = {"0": {"verdict": "yes", "score": 5}, "1": {"verdict": "no", "score": 1}}
    aggregate.report(items, verdicts, "judge-x", tmp_path / "msvd")
    aggregate.report(items, {}, "exact_match", tmp_path / "nextoe")
    capsys.readouterr()
    dirs = [str(tmp_path / d) for d in ("msvd", "nextoe")]
    assert aggregate.main(["--results-dirs", *dirs, "--names", "MSVD-QA", "NExT-OE",
                           "--output", str(tmp_path / "all.csv")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["dataset", "judge", "acc(%)", "score", "total", "judged", "failed", "missing"]
    assert table[2].split() == ["MSVD-QA", "judge-x", "50.00", "3.000", "4", "2", "2", "0"]
    assert table[3].split() == ["NExT-OE", "exact_match", "-", "-", "4", "0", "4", "0"]
    assert (tmp_path / "all.csv").read_text().splitlines()[1].startswith("MSVD-QA,judge-x,0.5,3.0,4,2,2,0")
    assert aggregate.main(["--results-dirs", *dirs, str(tmp_path / "absent")]) == 1


def test_no_key_and_no_server_is_a_clear_error(tmp_path, monkeypatch, capsys):
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AZURE_OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    pred_file = make_preds(tmp_path, PREDS[:1], error_ids=())
    assert judge.main(["--pred-file", str(pred_file), "--output-dir", str(tmp_path / "out")]) == 1
    assert "no API key" in capsys.readouterr().err


def test_concurrency_is_bounded_by_num_workers(tmp_path):
    specs = [{"id": f"c{i}", "answer_type": "open", "reply": ""} for i in range(8)]
    pred_file = make_preds(tmp_path, specs, error_ids=())
    with FakeOpenAIServer(lambda req: Reply.hang(0.05, "{'pred': 'yes', 'score': 5}")) as srv:
        assert judge.main(["--pred-file", str(pred_file), "--output-dir", str(tmp_path / "out"),
                           "--judge-base-url", srv.base_url, "--num-workers", "3"]) == 0
    assert len(srv.requests) == 8 and srv.max_in_flight == 3
