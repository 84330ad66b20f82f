"""benchmarks/answers.py on the tiny preset (CPU, fp32): it runs end to end, and in fp32 the batched answers are
the one-at-a-time (fast path) answers token for token."""

import json

from benchmarks import answers


def test_answers_benchmark_tiny_cpu(tmp_path, capsys):
    out = tmp_path / "answers.json"
    answers.main(["--output", str(out), "--preset", "tiny", "--device", "cpu", "--ks", "1,2"])
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"1", "2"}
    for k, row in report["results"].items():
        assert row["agreement"]["batched_vs_one_at_a_time"] == {"identical": int(k), "first_token": int(k),
                                                                "mean_common_prefix": 8.0, "of": int(k)}
        for mode in ("sequential", "batched"):
            assert row[mode]["ttft_ms"]["n"] == int(k) and row[mode]["tokens_per_s"] > 0
        assert row["batched"]["kv_gb"] >= 0 and row["batched"]["slot_len"] % 128 == 0
    assert report["k1_first_token_ms"]["batch"] > 0
    assert "| 2 | batched |" in capsys.readouterr().out
