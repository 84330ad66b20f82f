"""Scheduling and memory in the server: the memory budget (429 when full, room again when a session leaves),
per-session ingest lag and drop metrics, and ingest keeping up while a burst of questions runs -- through the
real server process on the tiny model (CPU), plus the budget's sizes and the ingest-first rule pinned in
process."""

import asyncio
import json
import re
import time

import pytest
import torch
import websockets

from flash_vstream.model import VStreamConfig
from flash_vstream.model.memory import STARMemory, memory_num_tokens
from flash_vstream.serve.api.scheduler import (MemoryBudget, ServerEngine, answer_pool_bytes, kv_bytes_per_token,
                                               question_bytes, session_state_bytes, snapshot_bytes, stack_rows)
from flash_vstream.serve.engine import SessionError
from flash_vstream.serve.session import PROMPT_ROOM
from serve.test_server_support import RunningServer, assert_error, data_url, jpeg_frames


def metric(text, name, **labels):
    """The value of the first sample of `name` with `labels` in the Prometheus text, or None."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, rest = head.partition("{")
        if sample == name and all(dict(re.findall(r'(\w+)="([^"]*)"', rest)).get(k) == str(v)
                                  for k, v in labels.items()):
            return float(value)
    return None


@pytest.fixture(scope="module")
def frames(example_mp4):
    return jpeg_frames(example_mp4, n=12)


@pytest.fixture(scope="module")
def tiny_config(tiny_model_dir):
    return VStreamConfig.from_pretrained(tiny_model_dir)


# --- the budget's sizes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["paper", "upstream"])
def test_session_bytes_are_a_memory_row_and_a_snapshot(tiny_config, mode):
    """What a session reserves is what its STAR memory holds (its row of a memory stack, fp32 and bf16
    frames) plus one published snapshot: measured on a real memory fed more frames than its buffer holds."""
    config = VStreamConfig(**{**tiny_config.to_dict(), "memory_mode": mode, "video_buffer_length": 27})
    for dtype in (torch.float32, torch.bfloat16) if mode == "paper" else (torch.float32,):
        memory = STARMemory(config, seed=0)
        g = torch.Generator().manual_seed(0)
        for t in range(config.buffer_frames + 1):  # past the buffer, and enough frames for every memory token
            memory.update(torch.randn(1, 256, config.mm_hidden_size, generator=g).to(dtype), [float(t)])
        snapshot = memory.read()
        held = memory.nbytes + snapshot.nelement() * snapshot.element_size()  # its stack row + the snapshot
        assert snapshot.shape[0] == memory_num_tokens(10**6, config)
        assert session_state_bytes(config, dtype.itemsize) == held, (mode, dtype)


def test_the_answer_pool_is_its_slots_of_kv_cache_and_a_question_its_prompt_embeddings():
    config = VStreamConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           intermediate_size=11008, vocab_size=32000)
    assert kv_bytes_per_token(config, 2) == 2 * 32 * 8 * 128 * 2  # K and V, every layer, bf16
    # 681 memory + 256 prompt + 64 answer = 1001 positions -> 1024 per slot
    assert answer_pool_bytes(config, 2, 16, 64, 2048) == 16 * 1024 * 131072
    assert answer_pool_bytes(config, 2, 1, 4000, 2048) == 2048 * 131072  # never past the context
    assert question_bytes(config, 2, 681) == (PROMPT_ROOM + 681) * 4096 * 2


def test_memory_budget_reserves_refuses_and_releases():
    budget = MemoryBudget(100)
    budget.reserve("a", "session", 60, "a session")
    with pytest.raises(SessionError) as refused:
        budget.reserve("b", "session", 50, "a new session")
    assert refused.value.status == 429 and refused.value.code == "memory_budget_exceeded"
    assert "a new session" in refused.value.message
    budget.reserve("q", "question", 40, "a question")
    assert budget.describe() == {"total_bytes": 100, "sessions_bytes": 60, "answers_bytes": 0, "questions_bytes": 40,
                                 "refused": {"session": 1}}
    budget.release("a")
    budget.reserve("b", "session", 50, "a new session")
    assert budget.used() == 90
    budget.release("q")
    with pytest.raises(SessionError):  # what fits for good must also fit for the moment it peaks
        budget.reserve("b", "session", 60, "a session", peak=110)
    assert budget.used() == 50  # a refused reservation leaves what the key held
    budget.reserve("c", "session", 50, "a session", check=False)  # unchecked: e.g. bytes given back
    assert budget.used() == 100
    MemoryBudget(None).reserve("x", "session", 10**15, "anything")  # unbounded: counted, never refused


def test_stack_rows_double_never_shrink_and_peak_while_growing():
    assert stack_rows(0, 5) == (5, 5)  # the first stack is made for the memories at hand
    assert stack_rows(8, 3) == (8, 8)  # never shrinks
    assert stack_rows(8, 9) == (16, 24)  # doubles: old and new rows exist together for a moment
    assert stack_rows(8, 17) == (32, 48)


# --- ingest first, in process ---------------------------------------------------------------------------------
def test_new_answers_wait_while_the_ingest_lane_is_behind(tiny_model_dir):
    """While a frame has waited longer than the target, a new question is held back (deferred), at most
    max_answer_defer_s; without a backlog it goes to the answer lane at once. Both answer from the memory as
    it stood when they arrived."""
    from flash_vstream.model.builder import load_pretrained_model
    from flash_vstream.serve.session import StreamSession

    tokenizer, model, processor, _ = load_pretrained_model(tiny_model_dir, device="cpu")
    engine = ServerEngine(lambda fps: StreamSession(model, tokenizer, processor, max_new_tokens=4, video_fps=fps,
                                                    fast=False),
                          ingest_lag_target_s=0.2, max_answer_defer_s=0.6).start()
    try:
        stream = engine.create({"type": "push"}, 1.0)
        frame = torch.randint(0, 255, (48, 64, 3), dtype=torch.uint8).numpy()
        engine.push_frame(stream, frame, 0.0, wait=True).result(30)
        job = engine.ask(stream, "now?")
        assert engine.deferred_count() == 0 and job.future.result(30).answer.frames_seen == 1

        other = engine.create({"type": "push"}, 1.0)
        other.unlanded[object()] = time.perf_counter() - 5.0  # a frame of another session waited 5 s: behind
        assert engine.ingest_backlog_s() >= 5.0
        asked = time.perf_counter()
        job = engine.ask(stream, "and now?")
        assert engine.deferred_count() == 1 and not job.future.done()
        result = job.future.result(30)
        assert result.wait_s >= 0.6 - 0.05 and time.perf_counter() - asked >= 0.55  # held back, then answered
        assert result.answer.frames_seen == 1 and engine.questions_deferred == 1
        other.unlanded.clear()
        assert engine.ingest_backlog_s() == 0.0
    finally:
        engine.shutdown()


# --- through the real server ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tight(tiny_model_dir, tiny_config, tmp_path_factory):
    """A server whose budget holds the answers' KV cache, two sessions (a stack of two memory rows) and not
    one question more."""
    session = session_state_bytes(tiny_config, 4)  # the tiny model is fp32 on the CPU
    question = question_bytes(tiny_config, 4, memory_num_tokens(3, tiny_config))
    pool = answer_pool_bytes(tiny_config, 4, 16, 8, 2048)  # --max-batch 16 (the default), --max-tokens 8
    budget = pool + 2 * session + question // 2
    srv = RunningServer(tiny_model_dir, "--memory-budget-gb", f"{budget / 1e9:.9f}", "--max-tokens", 8,
                        log_dir=tmp_path_factory.mktemp("logs"))
    srv.model_dir = tiny_model_dir
    yield srv, session
    srv.stop()


def test_429_when_the_budget_is_full_and_room_again_when_a_session_leaves(tight, frames):
    srv, session_bytes = tight
    text = srv.get("/metrics").text
    assert metric(text, "flash_vstream_memory_budget_bytes", kind="per_session") == session_bytes
    assert metric(text, "flash_vstream_memory_budget_bytes", kind="answers") == answer_pool_bytes(
        VStreamConfig.from_pretrained(srv.model_dir), 4, 16, 8, 2048)
    first, second = srv.session()["id"], srv.session()["id"]
    for i in range(3):
        assert srv.push(first, frames[i], float(i)).status_code == 200
    assert srv.push(second, frames[0], 0.0).status_code == 200  # both memories are rows of the stack now
    assert metric(srv.get("/metrics").text, "flash_vstream_memory_stack_rows") == 2
    # a third needs the stack to double (4 rows, 6 while it grows): refused
    error = assert_error(srv.post("/v1/sessions", json={"source": {"type": "push"}}), 429, "memory_budget_exceeded")
    assert "a new session" in error["message"] and "MiB" in error["message"]
    # the two sessions took the budget: a question does not fit (HTTP and WebSocket), nothing runs out of memory
    assert_error(srv.post(f"/v1/sessions/{first}/questions", json={"question": "what now?"}), 429,
                 "memory_budget_exceeded")

    async def ws_question():
        async with websockets.connect(f"{srv.ws_url}/v1/sessions/{first}/ws") as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            await ws.send(json.dumps({"type": "response.create", "question": "and now?", "response_id": "r1"}))
            return json.loads(await asyncio.wait_for(ws.recv(), 30))

    event = asyncio.run(ws_question())
    assert event["type"] == "error" and event["code"] == "memory_budget_exceeded" and event["response_id"] == "r1"
    text = srv.get("/metrics").text
    assert metric(text, "flash_vstream_memory_budget_refused", kind="session") == 1
    assert metric(text, "flash_vstream_memory_budget_refused", kind="question") == 2
    assert metric(text, "flash_vstream_memory_budget_bytes", kind="sessions") == 2 * session_bytes

    assert srv.delete(f"/v1/sessions/{second}").status_code == 200  # its memory's bytes come back
    answer = srv.post(f"/v1/sessions/{first}/questions", json={"question": "what now?", "max_tokens": 4})
    assert answer.status_code == 200 and answer.json()["frames_seen"] == 3
    third = srv.session()["id"]  # the answer is done: its bytes came back too, a session fits its free row
    assert_error(srv.post("/v1/sessions", json={"source": {"type": "push"}}), 429, "memory_budget_exceeded")
    for s in (first, third):
        srv.delete(f"/v1/sessions/{s}")
    # the stack keeps its two rows (it never shrinks): the budget still counts them, the snapshots are back
    row = session_bytes - snapshot_bytes(VStreamConfig.from_pretrained(srv.model_dir), 4)
    assert metric(srv.get("/metrics").text, "flash_vstream_memory_budget_bytes", kind="sessions") == 2 * row


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = RunningServer(tiny_model_dir, "--max-tokens", 16, "--max-sessions", 8,
                        log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    srv.stop()


def test_lag_and_drop_metrics_are_there_and_move(server, frames):
    """Each ingested frame adds a lag sample (session object and /metrics); a frame sampled faster than the
    session's fps is dropped and counted (session object, per-session gauge, the drop counter)."""
    sid = server.session()["id"]
    body = server.get(f"/v1/sessions/{sid}").json()
    assert body["ingest_lag_s"] == {"count": 0, "last": None, "p50": None, "p99": None, "max": None}
    assert body["frames_ingested"] == 0 and body["queued_frames"] == 0
    before = metric(server.get("/metrics").text, "flash_vstream_ingest_lag_seconds_count") or 0
    for i in range(3):
        assert server.push(sid, frames[i], float(i)).status_code == 200
    assert server.push(sid, frames[3], 2.5).json()["dropped_frames"] == 1  # 2.5 s: faster than 1 fps
    body = server.get(f"/v1/sessions/{sid}").json()
    lag = body["ingest_lag_s"]
    assert body["frames_ingested"] == 3 and body["dropped_frames"] == 1
    assert lag["count"] == 3 and 0 < lag["p50"] <= lag["p99"] <= lag["max"] < 10 and lag["last"] > 0
    text = server.get("/metrics").text
    assert metric(text, "flash_vstream_ingest_lag_seconds_count") == before + 3
    assert metric(text, "flash_vstream_session_frames_ingested", session=sid) == 3
    assert metric(text, "flash_vstream_session_dropped_frames", session=sid) == 1
    assert metric(text, "flash_vstream_session_ingest_lag_seconds", session=sid, quantile="0.99") == \
        pytest.approx(lag["p99"])
    assert metric(text, "flash_vstream_ingest_backlog_seconds") == 0
    assert server.push(sid, frames[4], 3.0).status_code == 200
    assert server.get(f"/v1/sessions/{sid}").json()["ingest_lag_s"]["count"] == 4
    server.delete(f"/v1/sessions/{sid}")


def test_ingest_keeps_up_while_a_burst_of_questions_runs(server, frames):
    """A 4-fps stream pushed over its WebSocket while three other sessions ask 12 questions at once: every
    frame reaches the memory (none dropped) within a second, and every question is answered."""
    askers = []
    for _ in range(3):
        sid = server.session()["id"]
        for i in range(2):
            assert server.push(sid, frames[i], float(i)).status_code == 200
        askers.append(sid)
    streamed = server.post("/v1/sessions", json={"source": {"type": "push"}, "fps": 4.0}).json()["id"]
    n_frames = 12

    async def stream_frames():
        async with websockets.connect(f"{server.ws_url}/v1/sessions/{streamed}/ws") as ws:
            await ws.recv()
            for k in range(n_frames):
                await ws.send(json.dumps({"type": "input_image.append", "timestamp": k / 4,
                                          "image": data_url(frames[k % len(frames)])}))
                await asyncio.sleep(0.25)

    async def burst(sid):
        async with websockets.connect(f"{server.ws_url}/v1/sessions/{sid}/ws") as ws:
            await ws.recv()
            for i in range(4):
                await ws.send(json.dumps({"type": "response.create", "question": "what is it?",
                                          "response_id": f"b{i}", "max_tokens": 16}))
            done = []
            while len(done) < 4:
                event = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if event["type"] in ("response.done", "error"):
                    done.append(event["type"])
            return done

    async def main():
        return await asyncio.gather(stream_frames(), *[burst(sid) for sid in askers])

    _, *outcomes = asyncio.run(main())
    assert all(o == ["response.done"] * 4 for o in outcomes), outcomes
    deadline = time.monotonic() + 10
    while (body := server.get(f"/v1/sessions/{streamed}").json())["frames_ingested"] < n_frames:
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert body["dropped_frames"] == 0 and body["ingest_lag_s"]["count"] == n_frames
    assert body["ingest_lag_s"]["p99"] <= 1.0, body["ingest_lag_s"]
    for sid in askers + [streamed]:
        server.delete(f"/v1/sessions/{sid}")


def test_websocket_frames_are_not_deflated(server):
    """The client offers permessage-deflate (websockets does by default); the server declines it: JPEG frames do
    not compress, and inflating each one would cost the event loop that every stream shares."""
    sid = server.session()["id"]

    async def handshake():
        async with websockets.connect(f"{server.ws_url}/v1/sessions/{sid}/ws") as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            return ws.response.headers.get("Sec-WebSocket-Extensions")

    assert not asyncio.run(handshake())
    server.delete(f"/v1/sessions/{sid}")
