"""The realtime CLI: the real entry point, a real pseudo-terminal (the engine's roles: test_engine.py)."""

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from flash_vstream.model.builder import load_pretrained_model
from flash_vstream.serve import cli_video_stream as cli
from flash_vstream.serve.session import StreamSession
from flash_vstream.serve.sources import open_source
from flash_vstream.video_io import VideoReadError, iter_frames

from support import REPO
MODULE = "flash_vstream.serve.cli_video_stream"
PNG = b"\x89PNG\r\n\x1a\n"


def _write_questions(path, questions):
    with open(path, "w") as f:
        for q in questions:
            f.write(json.dumps(q) + "\n")
    return str(path)


def _run_cli(args, timeout=180, env=None):
    return subprocess.run([sys.executable, "-m", MODULE, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else {**os.environ, **env})


def _events(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------ scripted, subprocess

def test_scripted_cli_gives_the_core_answers(tiny_model_dir, example_mp4, tmp_path):
    questions = [{"time": 4.5, "question": "what is in the video?", "id": "a"},
                 {"time": 100, "question": "describe the video.", "id": "b"}]
    qfile = _write_questions(tmp_path / "q.jsonl", questions)
    out, log, plot = tmp_path / "a.jsonl", tmp_path / "log.jsonl", tmp_path / "memory.png"
    result = _run_cli(["--model-path", tiny_model_dir, "--video-file", example_mp4, "--questions", qfile,
                       "--output", str(out), "--max-frames", "8", "--play_speed", "50", "--device", "cpu",
                       "--max-new-tokens", "8", "--log-file", str(log), "--memory-plot", str(plot),
                       "--fast", "on"])  # the CUDA path (forced on here) against the stock core below
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out) as f:
        records = [json.loads(line) for line in f]
    assert [r["id"] for r in records] == ["a", "b"]
    assert [r["frames_seen"] for r in records] == [5, 8]  # 5 frames, a question, 3 frames, a question, end
    for r in records:
        assert {"time", "question", "answer", "frames_seen", "memory_tokens", "latency_s", "ttft_s"} <= set(r)
        assert r["latency_s"] >= r["ttft_s"] > 0

    # the same timeline through the synchronous core (stock path), in this process
    tokenizer, model, image_processor, _ = load_pretrained_model(tiny_model_dir, device="cpu")
    session = StreamSession(model, tokenizer, image_processor, max_new_tokens=8)
    frames = [item for item, _ in zip(iter_frames(example_mp4, fps=1.0), range(8))]
    expected = session.run_timeline(frames, questions)
    for got, want in zip(records, expected):
        for key in ("time", "question", "answer", "frames_seen", "memory_tokens", "stream_time"):
            assert got[key] == want[key], key

    events = _events(log)
    assert events[0]["event"] == "start" and events[0]["mode"] == "scripted"
    summary = events[-1]
    assert summary["event"] == "summary" and summary["exit_code"] == 0 and summary["answered"] == 2
    latency = summary["latency_s"]
    assert latency["frame_decode"]["count"] == latency["encode_memory_update"]["count"] == 8
    assert latency["time_to_first_token"]["count"] == latency["answer_time"]["count"] == 2
    for stats in latency.values():
        assert set(stats) == {"count", "mean", "p50", "p99", "max"}
    assert summary["frames"] == {"produced": 8, "ingested": 8, "dropped": 0, "stream_time": 7.0}
    assert "encode + memory update" in result.stderr and "p99" in result.stderr
    assert plot.read_bytes()[:8] == PNG


@pytest.mark.slow  # a long end-to-end run: CI's second step (.ci/run)
def test_long_stream_keeps_memory_state_and_rss_flat(tiny_model_dir, tmp_path):
    qfile = _write_questions(tmp_path / "q.jsonl", [{"time": 1e6, "question": "what is in the video?"}])
    log = tmp_path / "log.jsonl"
    result = _run_cli(["--model-path", tiny_model_dir, "--video-source", "synthetic:32x32", "--max-frames", "3000",
                       "--play_speed", "inf", "--device", "cpu", "--max-new-tokens", "4", "--questions", qfile,
                       "--log-file", str(log), "--log-every", "500"], timeout=400,
                      # two roles each running a torch thread team on a busy 2-core runner spin against
                      # each other (10x slower); one thread per role keeps this test quick
                      env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (answer,) = [json.loads(line) for line in result.stdout.splitlines()]  # scripted, no --output: JSON on stdout
    assert answer["frames_seen"] == 3000 and answer["memory_tokens"] == 681
    progress = {e["frames"]: e for e in _events(log) if e["event"] == "progress" and not e["final"]}
    early, late = progress[500], progress[3000]
    assert early["state_bytes"] == late["state_bytes"] > 0
    assert early["memory_tokens"] == late["memory_tokens"] == 681
    assert late["rss_bytes"] - early["rss_bytes"] < 24 * 2**20, (early["rss_bytes"], late["rss_bytes"])
    assert late["dropped"] == 0


def test_corrupt_file_ends_with_an_error_not_a_hang(tiny_model_dir, example_mp4, tmp_path):
    broken = tmp_path / "truncated.mp4"
    with open(example_mp4, "rb") as f:
        data = f.read()
    broken.write_bytes(data[: len(data) // 2])
    qfile = _write_questions(tmp_path / "q.jsonl", [{"time": 2, "question": "what is in the video?"},
                                                    {"time": 1000, "question": "and at the end?"}])
    out = tmp_path / "a.jsonl"
    began = time.monotonic()
    result = _run_cli(["--model-path", tiny_model_dir, "--video-file", str(broken), "--questions", qfile,
                       "--output", str(out), "--play_speed", "inf", "--device", "cpu", "--max-new-tokens", "4"],
                      timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: frame source failed: VideoReadError" in result.stderr
    assert "truncated.mp4" in result.stderr and "Traceback" not in result.stderr
    with open(out) as f:
        answered = [json.loads(line) for line in f]
    assert [a["time"] for a in answered] == [2.0]  # answered before the failure; the end never came
    assert time.monotonic() - began < 120


def test_bad_arguments_exit_2(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"time": 1, "question": "ok"}\n{"time": -3, "question": "bad"}\n')
    assert cli.main(["--model-path", tiny_model_dir, "--video-source", "synthetic", "--questions", str(bad)]) == 2
    assert "time" in capsys.readouterr().err
    assert cli.main(["--model-path", tiny_model_dir, "--video-file", str(tmp_path / "missing.mp4")]) == 2
    assert cli.main(["--model-path", tiny_model_dir, "--video-source", "synthetic", "--play_speed", "0"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["--model-path", tiny_model_dir])  # no source


# ------------------------------------------------------------------------------ interactive

class _Pty:
    """A child process on a pseudo-terminal: type lines, read until some text appears."""

    def __init__(self, argv, env=None):
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     close_fds=True)
        os.close(slave)
        self.master = master
        self.text = ""
        self.cursor = 0

    def _read(self, wait):
        ready, _, _ = select.select([self.master], [], [], wait)
        if not ready:
            return True
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.text += data.decode(errors="replace")
        return bool(data)

    def expect(self, pattern, timeout=90):
        """Wait for `pattern` after the previous match; the match moves the cursor past it."""
        deadline = time.monotonic() + timeout
        while not (match := re.compile(pattern).search(self.text, self.cursor)):
            if time.monotonic() > deadline or not self._read(0.2):
                self.close()
                raise AssertionError(f"{pattern!r} not seen; output so far:\n{self.text[-3000:]}")
        self.cursor = match.end()
        return match

    def type(self, data):
        os.write(self.master, data.encode() if isinstance(data, str) else data)

    def wait(self, timeout=60):
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        drain = time.monotonic() + 2
        while time.monotonic() < drain and self._read(0.05):  # the rest of the output, until EOF
            pass
        code = self.proc.poll()
        if code is None:
            self.close()
        return code

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


def test_interactive_session_through_the_script_on_a_pty(tiny_model_dir, example_mp4, tmp_path):
    env = dict(os.environ, MODEL_PATH=tiny_model_dir, VIDEO_FILE=example_mp4, DEVICE="cpu")
    log = tmp_path / "log.jsonl"
    term = _Pty(["bash", "scripts/realtime_cli.sh", "--play_speed", "4", "--max-new-tokens", "8",
                 "--log-file", str(log)], env=env)
    term.expect(r"USER: ")
    term.type("what is in the video?\n")
    label = term.expect(r"ASSISTANT \(stream (\d+\.\d)s, (\d+) frames?\): ")
    assert int(label.group(2)) >= 1
    term.expect(r"\nUSER: ")
    term.type("/status\n")
    term.expect(r"\[\d+ frames ingested, 0 dropped")
    term.expect(r"stream ended at 38\.0s after 39 frames")
    assert term.wait() == 0, term.text[-3000:]
    events = _events(log)
    assert events[-1]["event"] == "summary" and events[-1]["answered"] == 1
    assert events[-1]["frames"]["ingested"] == 39


def test_ctrl_d_ends_an_endless_stream(tiny_model_dir):
    term = _Pty([sys.executable, "-m", MODULE, "--model-path", tiny_model_dir, "--video-source", "synthetic:32x32",
                 "--device", "cpu", "--max-new-tokens", "4", "--play_speed", "2"])
    term.expect(r"USER: ")
    term.type("what is in the video?\n")
    term.expect(r"ASSISTANT \(stream .*\n")
    term.expect(r"USER: ")
    term.type(b"\x04")  # Ctrl-D at an empty prompt
    assert term.wait(30) == 0, term.text[-3000:]
    assert "[bye]" in term.text


@pytest.mark.parametrize("fast", ["off", "on"])  # on: the prefix refresh runs on the ingest thread beside answers
def test_piped_questions_then_quit_in_process(tiny_model_dir, fast):
    out = io.StringIO()
    code = cli.main(["--model-path", tiny_model_dir, "--video-source", "synthetic:32x32", "--device", "cpu",
                     "--max-new-tokens", "4", "--play_speed", "inf", "--fast", fast],
                    stdin=io.StringIO("\nwhat is in the video?\n/status\n/quit\nnever asked?\n"), stdout=out)
    text = out.getvalue()
    assert code == 0, text
    assert text.count("ASSISTANT (stream") == 1 and "frames ingested" in text and "[bye]" in text


def test_sources(example_mp4):
    source = open_source(video_file=example_mp4, max_frames=3)
    assert not source.live and [t for _, t in source.frames()] == [0.0, 1.0, 2.0]
    assert open_source(video_source="rtsp://127.0.0.1:1/x").live
    assert open_source(video_source="0").kind == "camera"
    synthetic = open_source(video_source="synthetic:8x6", max_frames=2, video_fps=2.0)
    frames = list(synthetic.frames())
    assert [t for _, t in frames] == [0.0, 0.5] and frames[0][0].shape == (6, 8, 3)
    with pytest.raises(ValueError):
        open_source(video_source="not-a-source")
    with pytest.raises(VideoReadError):
        open_source(video_file="/nonexistent/video.mp4")
