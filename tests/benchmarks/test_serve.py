"""benchmarks/serve.py end to end on the CPU: the tiny model, real WebSocket clients in a spawned process
against the in-process server, today's design beside it, the CLI fast path's first token; the JSON report."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.serve import QUESTION, TARGET_TTFT_S, summarize, word_tokenizer
from flash_vstream.conversation import build_prompt
from flash_vstream.mm_utils import tokenizer_image_token
from support import REPO


def test_word_tokenizer_decodes_every_id_and_reads_the_prompt():
    """Random 7B weights emit any of Vicuna's 32000 ids: each decodes; the prompt's words are known ids."""
    tokenizer = word_tokenizer(32000)
    assert len(tokenizer) == 32000 and tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    assert tokenizer.decode([31999, 5, 2], skip_special_tokens=True) == "w31999 " + tokenizer.convert_ids_to_tokens(5)
    ids = tokenizer_image_token(build_prompt(QUESTION, "vicuna_v1"), tokenizer)
    assert ids[0] == 1 and ids.count(-200) == 1 and tokenizer.unk_token_id not in ids


def _question(first_s, outcome="done"):
    return {"outcome": outcome, "first_s": first_s, "done_s": first_s and first_s + 1.0, "server_ttft_s": None}


@pytest.mark.parametrize("change, holds", [
    ({}, True),
    ({"lags": [0.1] * 98 + [2.0, 2.0]}, False),  # lag p99 over 1 s
    ({"questions": [_question(0.05)] * 9 + [_question(TARGET_TTFT_S * 3)]}, False),  # first token p99 over 150 ms
    ({"dropped": 1}, False),
    ({"questions": [_question(0.05)] * 9 + [_question(None, "memory_budget_exceeded")]}, False),  # refused
    ({"aborted": "a frame waited 6.0 s"}, False),
])
def test_a_level_holds_only_when_every_target_does(change, holds):
    args = dict(lags=[0.1] * 100, questions=[_question(0.05)] * 10, dropped=0, aborted=None)
    args.update(change)
    row = summarize("server", 10, args["lags"], args["questions"], args["dropped"], 100, 100, [], args["aborted"],
                    None, None, 1.0, 30.0)
    assert row["holds"] is holds, row


@pytest.mark.slow  # ~35 s on two busy cores: spawned client processes, three short load levels
def test_serve_benchmark_smoke(tmp_path):
    """scripts/bench_serve.sh OUT --smoke: the report and the plot; the plot drawn again from the report."""
    out = tmp_path / "serve.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    run = subprocess.run(["bash", "scripts/bench_serve.sh", str(tmp_path), "--preset", "tiny", "--device", "cpu",
                          "--smoke", "--levels", "1,2"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert [row["streams"] for row in report["levels"]] == [1, 2]
    assert [row["streams"] for row in report["baseline"]] == [2]
    for row in report["levels"] + report["baseline"]:
        # every stream asked, every question was answered, and the lag of the measured frames is there
        assert row["questions"] == row["answered"] >= row["streams"], row
        assert row["ingest_lag_s"]["n"] > 0 and 0 < row["ingest_lag_s"]["p50"] <= row["ingest_lag_s"]["p99"]
        assert row["first_token_s"]["p50"] > 0 and row["answer_s"]["p50"] >= row["first_token_s"]["p50"]
        assert row["dropped_frames"] == 0 and row["frames_ingested"] > 0
    server = report["levels"][1]
    assert server["frames_sent"] >= server["frames_ingested"] > 0 and not server["errors"]
    assert report["cli_fast_path"]["first_token_s"]["n"] == 8
    assert report["single_session"]["ratio"] > 0
    assert set(report["largest_holding"]) == {"server", "baseline"}
    assert "largest N that holds" in run.stdout and "baseline" in run.stdout
    assert (tmp_path / "serve_latency.png").stat().st_size > 10_000
    png = tmp_path / "latency.png"  # the docs' plot is drawn from a report the same way
    replot = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--output", str(out), "--replot", "--plot",
                             str(png)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert replot.returncode == 0 and png.stat().st_size > 10_000, replot.stderr


def test_host_cpu_is_per_frame_per_token_and_cores_per_thread_kind():
    from benchmarks.serve import host_cpu, thread_cpu_s

    now = thread_cpu_s()
    assert now is not None and "MainThread" in now and all(v >= 0 for v in now.values())
    out = host_cpu({"frame handler": 1.0}, {"frame handler": 3.0, "io": 0.5, "idle": 0.0}, frames=400, tokens=1000,
                   seconds=10.0)
    assert out == {"frame handler": {"cpu_s": 2.0, "cores": 0.2, "ms_per_frame": 5.0, "ms_per_token": 2.0},
                   "io": {"cpu_s": 0.5, "cores": 0.05, "ms_per_frame": 1.25, "ms_per_token": 0.5}}
    assert host_cpu(None, now, 1, 1, 1.0) is None
