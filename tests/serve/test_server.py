"""The streaming server, end to end on CPU: the real process with the tiny model, driven over HTTP, WebSocket
and the real `openai` client, to the contract in SERVING.md (endpoints, events, fields, error shapes)."""

import asyncio
import json
import os
import sys
import threading

import openai
import pytest
import requests
import websockets

from serve.test_server_support import RunningServer, assert_error, data_url, jpeg_frames

KEY = "test-key-3f9a"
SESSION_FIELDS = {"id", "object", "state", "frames_seen", "stream_time", "memory_tokens", "dropped_frames", "error"}
ANSWER_FIELDS = {"frames_seen", "stream_time", "memory_tokens", "ttft_s", "latency_s"}


@pytest.fixture(scope="module")
def media_root(tmp_path_factory, make_video):
    root = tmp_path_factory.mktemp("media")
    outside = tmp_path_factory.mktemp("outside")
    make_video(root / "clip.mp4", n=30, rate=10)  # 3 s: three frames at 1 fps
    make_video(outside / "secret.mp4", n=10, rate=10)
    os.makedirs(root / "sub")
    os.symlink(outside / "secret.mp4", root / "sub" / "link.mp4")  # a link that leads outside
    os.symlink(root / "clip.mp4", root / "inside_link.mp4")  # one that stays inside: fine
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir, media_root, tmp_path_factory):
    srv = RunningServer(tiny_model_dir, "--media-root", media_root, "--max-sessions", 6, "--max-frame-bytes", 60000,
                        "--max-question-chars", 200, "--max-tokens", 16, key=KEY,
                        log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    srv.stop()
    assert KEY not in srv.log(), "the API key was logged"


@pytest.fixture(scope="module")
def frames(example_mp4):
    return jpeg_frames(example_mp4, n=6)


def _fed_session(server, frames, n=3):
    session = server.session()
    for i in range(n):
        assert server.push(session["id"], frames[i], float(i)).status_code == 200
    return session["id"]


def test_health_page_and_auth(server):
    anonymous = server.url
    assert requests.get(anonymous + "/health", timeout=10).json() == {"status": "ok"}
    assert requests.get(anonymous + "/", timeout=10).status_code == 200  # the page asks for the key itself
    assert_error(requests.get(anonymous + "/v1/models", timeout=10), 401)
    assert_error(requests.get(anonymous + "/v1/sessions", headers={"Authorization": "Bearer wrong"}, timeout=10), 401)
    assert_error(requests.post(anonymous + "/v1/sessions", json={}, timeout=10), 401)
    models = server.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert_error(server.get("/v1/nothing-here"), 404)


def test_push_session_over_http(server, frames):
    created = server.post("/v1/sessions", json={"source": {"type": "push"}, "fps": 1.0})
    assert created.status_code == 201
    session = created.json()
    assert SESSION_FIELDS <= set(session)
    assert (session["object"], session["state"], session["frames_seen"], session["error"]) == ("session", "running",
                                                                                                0, None)
    sid = session["id"]
    assert server.push(sid, frames[0], 0.0).json()["frames_seen"] == 1
    # JSON body with a data URL
    r = server.post(f"/v1/sessions/{sid}/frames", json={"image": data_url(frames[1]), "timestamp": 1.0})
    assert r.status_code == 200 and (r.json()["frames_seen"], r.json()["stream_time"]) == (2, 1.0)
    # faster than the session's 1 fps: dropped and counted, not queued
    r = server.push(sid, frames[2], 1.4)
    assert r.status_code == 200 and r.json()["frames_seen"] == 2
    assert server.get(f"/v1/sessions/{sid}").json()["dropped_frames"] == 1
    assert server.push(sid, frames[2], 2.0).json()["frames_seen"] == 3
    assert_error(server.push(sid, frames[3], 2.0), 400, "non_increasing_timestamp")
    assert_error(server.push(sid, frames[3], 1.0), 400, "non_increasing_timestamp")

    answer = server.post(f"/v1/sessions/{sid}/questions", json={"question": "what is shown?", "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert {"answer"} | ANSWER_FIELDS <= set(body) and isinstance(body["answer"], str)
    assert (body["frames_seen"], body["stream_time"]) == (3, 2.0) and body["memory_tokens"] > 0
    assert 0 <= body["ttft_s"] <= body["latency_s"]
    listed = [s["id"] for s in server.get("/v1/sessions").json()["data"]]
    assert sid in listed

    assert server.delete(f"/v1/sessions/{sid}").status_code == 200
    assert_error(server.get(f"/v1/sessions/{sid}"), 404, "session_not_found")
    assert_error(server.push(sid, frames[4], 3.0), 404)
    assert_error(server.post(f"/v1/sessions/{sid}/questions", json={"question": "still there?"}), 404)
    assert_error(server.delete(f"/v1/sessions/{sid}"), 404)


def test_bad_input_gets_its_error_while_another_session_goes_on(server, frames, media_root):
    other = server.session()["id"]
    t = [0.0]

    def other_goes_on():
        r = server.push(other, frames[int(t[0]) % len(frames)], t[0])
        assert r.status_code == 200 and r.json()["frames_seen"] == int(t[0]) + 1
        t[0] += 1.0

    sid = server.session()["id"]
    assert_error(server.post(f"/v1/sessions/{sid}/questions", json={"question": "too early"}), 409, "no_frames_yet")
    other_goes_on()
    bad = [
        (server.post("/v1/sessions", data=b"{not json", headers={"Content-Type": "application/json"}), 400),
        (server.post("/v1/sessions", json={"source": {"type": "teleport"}}), 400),
        (server.post("/v1/sessions", json={"fps": -1}), 400),
        (server.post("/v1/sessions", json={"fps": "fast"}), 400),
        (server.post(f"/v1/sessions/{sid}/frames", params={"timestamp": 0}, data=b"\x89PNG not really",
                     headers={"Content-Type": "image/png"}), 400),
        (server.post(f"/v1/sessions/{sid}/frames", params={"timestamp": 0}, data=os.urandom(70000),
                     headers={"Content-Type": "image/jpeg"}), 413),
        (server.post(f"/v1/sessions/{sid}/frames", json={"image": data_url(os.urandom(70000)), "timestamp": 0}), 413),
        (server.post(f"/v1/sessions/{sid}/frames", json={"image": "data:image/jpeg;base64,@@@", "timestamp": 0}), 400),
        (server.post(f"/v1/sessions/{sid}/frames", data=frames[0], headers={"Content-Type": "image/jpeg"}), 400),
        (server.post(f"/v1/sessions/{sid}/frames", data=b"hello", headers={"Content-Type": "text/plain"}), 400),
        (server.post(f"/v1/sessions/{sid}/questions", data=b"[1, 2", headers={"Content-Type": "application/json"}),
         400),
        (server.post(f"/v1/sessions/{sid}/questions", json={"question": ""}), 400),
        (server.post(f"/v1/sessions/{sid}/questions", json={"question": "x" * 201}), 413),
        (server.post(f"/v1/sessions/{sid}/questions", json={"question": "hi", "max_tokens": 17}), 400),
        (server.post("/v1/sessions/sess_nope/questions", json={"question": "hi"}), 404),
    ]
    for response, status in bad:
        assert_error(response, status)
        other_goes_on()
    # a file session reads its own source: frames cannot be pushed to it
    file_session = server.session({"type": "file", "path": "clip.mp4", "play_speed": 0})["id"]
    assert_error(server.push(file_session, frames[0], 0.0), 409, "not_a_push_session")
    # remote URLs are off unless --allow-remote-sources
    assert_error(server.post("/v1/sessions", json={"source": {"type": "url", "url": "rtsp://127.0.0.1:1/x"}}), 400,
                 "remote_sources_disabled")
    other_goes_on()
    for s in (sid, other, file_session):
        server.delete(f"/v1/sessions/{s}")


def test_media_root_confinement(server, media_root, make_video, tmp_path):
    outside = make_video(tmp_path / "abs.mp4", n=10, rate=10)
    for path in ("../outside/secret.mp4", "sub/../../x.mp4", outside, "sub/link.mp4", "/etc/passwd"):
        assert_error(server.post("/v1/sessions", json={"source": {"type": "file", "path": path}}), 400)
        chat = server.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "video_url", "video_url": {"url": path}}]}]})
        assert_error(chat, 400)
    assert_error(server.post("/v1/sessions", json={"source": {"type": "file", "path": "missing.mp4"}}), 400)
    ok = server.session({"type": "file", "path": "inside_link.mp4", "play_speed": 0})
    done = server.wait_state(ok["id"], ("ended", "failed"))
    assert (done["state"], done["frames_seen"]) == ("ended", 3)
    server.delete(f"/v1/sessions/{ok['id']}")


def test_too_many_sessions_is_429(server):
    opened = []
    while True:
        r = server.post("/v1/sessions", json={"source": {"type": "push"}})
        if r.status_code != 201:
            assert_error(r, 429, "too_many_sessions")
            break
        opened.append(r.json()["id"])
        assert len(opened) <= 6
    for sid in opened:
        assert server.delete(f"/v1/sessions/{sid}").status_code == 200
    again = server.post("/v1/sessions", json={})
    assert again.status_code == 201  # room again
    server.delete(f"/v1/sessions/{again.json()['id']}")


def test_openai_client_on_a_live_session_and_on_videos(server, frames, media_root):
    sid = _fed_session(server, frames, 3)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "what happens in the video?"}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                           extra_body={"session_id": sid})
    text = reply.choices[0].message.content
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
    seen = reply.model_extra["flash_vstream"]
    assert (seen["frames_seen"], seen["stream_time"]) == (3, 2.0) and seen["memory_tokens"] > 0
    assert reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > seen["memory_tokens"]

    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=6, stream=True,
                                            extra_body={"session_id": sid})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert streamed.strip() == text  # greedy, same memory: the same answer, streamed

    # one-shot: a file under the media root, a data-URL video and a data-URL image
    with open(media_root / "clip.mp4", "rb") as f:
        clip = f.read()
    for part in ({"type": "video_url", "video_url": {"url": "clip.mp4"}},
                 {"type": "video_url", "video_url": {"url": data_url(clip, "video/mp4")}},
                 {"type": "image_url", "image_url": {"url": data_url(frames[0])}}):
        reply = client.chat.completions.create(model=model, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "text", "text": "describe it."}, part]}])
        seen = reply.model_extra["flash_vstream"]
        assert seen["frames_seen"] == (1 if part["type"] == "image_url" else 3), part["type"]
    chunks = list(client.chat.completions.create(model=model, max_tokens=4, stream=True, messages=[
        {"role": "user", "content": [{"type": "text", "text": "and streamed?"},
                                     {"type": "video_url", "video_url": {"url": "clip.mp4"}}]}]))
    assert chunks[-1].model_extra["flash_vstream"]["frames_seen"] == 3
    assert sid in [s["id"] for s in server.get("/v1/sessions").json()["data"]]
    assert len(server.get("/v1/sessions").json()["data"]) == 1  # one-shot sessions are gone

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=model, messages=messages, extra_body={"session_id": "sess_nope"})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=messages)  # no video, no session
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": data_url(b"not a video", "video/mp4")}}]}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    server.delete(f"/v1/sessions/{sid}")


async def _recv(ws, kind=None, timeout=60):
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if kind is None or event["type"] == kind or event["type"] == "error":
            return event


def test_websocket_session(server, frames):
    sid = server.session()["id"]
    big = data_url(os.urandom(70000))

    async def talk():
        async with websockets.connect(f"{server.ws_url}/v1/sessions/{sid}/ws?api_key={KEY}") as ws:
            created = await _recv(ws)
            assert created["type"] == "session.created" and created["session"]["id"] == sid
            for i in range(3):
                await ws.send(json.dumps({"type": "input_image.append", "image": data_url(frames[i]),
                                          "timestamp": float(i)}))
            for message, code in (("{oops", "invalid_json"), (json.dumps({"type": "dance"}), "unknown_event"),
                                  (json.dumps([1]), "invalid_event"),
                                  (json.dumps({"type": "input_image.append", "image": big, "timestamp": 9}),
                                   "too_large"),
                                  (json.dumps({"type": "input_image.append", "image": data_url(b"garbage"),
                                               "timestamp": 9}), "invalid_image"),
                                  (json.dumps({"type": "input_image.append", "image": data_url(frames[3]),
                                               "timestamp": 1.0}), "non_increasing_timestamp"),
                                  (json.dumps({"type": "response.create", "response_id": "bad", "question": ""}),
                                   "invalid_request")):
                await ws.send(message)
                error = await _recv(ws)
                assert (error["type"], error["code"]) == ("error", code), error
            assert error["response_id"] == "bad"
            while server.get(f"/v1/sessions/{sid}").json()["frames_seen"] < 3:
                await asyncio.sleep(0.05)
            await ws.send(json.dumps({"type": "response.create", "question": "what is shown?", "response_id": "q1",
                                      "max_tokens": 6}))
            deltas = []
            while True:
                event = await _recv(ws)
                assert event["type"] in ("response.output_text.delta", "response.done"), event
                assert event["response_id"] == "q1"
                if event["type"] == "response.done":
                    break
                deltas.append(event["delta"])
            assert ANSWER_FIELDS | {"text"} <= set(event) and event["frames_seen"] == 3
            assert "".join(deltas).strip() == event["text"]
            http = server.post(f"/v1/sessions/{sid}/questions", json={"question": "what is shown?", "max_tokens": 6})
            assert http.json()["answer"] == event["text"]  # the same memory, the same greedy answer
            await ws.send(json.dumps({"type": "session.close"}))
            with pytest.raises(websockets.ConnectionClosed):
                await _recv(ws, timeout=10)

        # the key in a header works too; a wrong key or an unknown session is refused at the handshake
        sid2 = server.session()["id"]
        async with websockets.connect(f"{server.ws_url}/v1/sessions/{sid2}/ws",
                                      additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            assert (await _recv(ws))["type"] == "session.created"
        for url, status in ((f"/v1/sessions/{sid2}/ws?api_key=wrong", 401), (f"/v1/sessions/{sid2}/ws", 401),
                            (f"/v1/sessions/sess_nope/ws?api_key={KEY}", 404)):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(server.ws_url + url):
                    pass
            assert refused.value.response.status_code == status
            assert "error" in json.loads(bytes(refused.value.response.body))
        return sid2

    sid2 = asyncio.run(talk())
    assert_error(server.get(f"/v1/sessions/{sid}"), 404)  # session.close deleted it
    server.delete(f"/v1/sessions/{sid2}")


def test_clients_vanishing_mid_answer(server, frames):
    """A WebSocket and an SSE client leave while their answers run; the answers stop, the server goes on."""
    sid = _fed_session(server, frames, 3)

    async def leave():
        for _ in range(2):
            async with websockets.connect(f"{server.ws_url}/v1/sessions/{sid}/ws?api_key={KEY}") as ws:
                await _recv(ws)
                await ws.send(json.dumps({"type": "response.create", "question": "go on and on", "max_tokens": 16}))
                await _recv(ws, "response.output_text.delta")

    asyncio.run(leave())
    r = server.post("/v1/chat/completions", stream=True, json={
        "model": "m", "stream": True, "max_tokens": 16, "session_id": sid,
        "messages": [{"role": "user", "content": "tell me everything"}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    first = next(r.iter_lines())
    assert first.startswith(b"data: ")
    r.close()  # gone after the first chunk
    # the session still ingests and answers; another session is unaffected
    assert server.push(sid, frames[3], 3.0).json()["frames_seen"] == 4
    answer = server.post(f"/v1/sessions/{sid}/questions", json={"question": "still here?", "max_tokens": 3})
    assert answer.status_code == 200 and answer.json()["frames_seen"] == 4
    assert server.get("/health").json() == {"status": "ok"}
    server.delete(f"/v1/sessions/{sid}")


def test_sessions_answer_while_others_ingest(server, frames):
    """Questions on one session while another session's frames go in: both proceed, each on its own memory."""
    asker = _fed_session(server, frames, 2)
    feeder = server.session()["id"]
    errors = []

    def feed():
        try:
            for i in range(6):
                r = server.push(feeder, frames[i], float(i))
                assert r.status_code == 200 and r.json()["frames_seen"] == i + 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=feed)
    thread.start()
    for _ in range(3):
        r = server.post(f"/v1/sessions/{asker}/questions", json={"question": "what now?", "max_tokens": 8})
        assert r.status_code == 200 and r.json()["frames_seen"] == 2
    thread.join(60)
    assert not errors and not thread.is_alive()
    assert server.get(f"/v1/sessions/{feeder}").json()["frames_seen"] == 6
    for s in (asker, feeder):
        server.delete(f"/v1/sessions/{s}")


def test_metrics(server):
    text = server.get("/metrics").text
    for name in ("flash_vstream_sessions{", "flash_vstream_frames_ingested_total", "flash_vstream_frames_dropped_total",
                 "flash_vstream_question_latency_seconds_bucket", "flash_vstream_time_to_first_token_seconds_count",
                 "flash_vstream_gpu_memory_bytes"):
        assert name in text, name
    ingested = [line for line in text.splitlines() if line.startswith("flash_vstream_frames_ingested_total")]
    assert float(ingested[0].split()[-1]) > 0


def test_serve_sh_starts_the_server(tiny_model_dir, tmp_path):
    """scripts/serve.sh on a given model: the start-up line, then a healthy server with the model listed."""
    srv = RunningServer(tiny_model_dir, log_dir=tmp_path, command=["bash", "scripts/serve.sh", "--max-tokens", "8"],
                        env={"MODEL_PATH": str(tiny_model_dir), "PORT": "0", "DEVICE": "cpu",
                             "FLASH_VSTREAM_NO_SETUP": "1", "PYTHON": sys.executable})
    try:
        assert requests.get(srv.url + "/health", timeout=10).json() == {"status": "ok"}
        assert srv.get("/v1/models").json()["data"][0]["id"] == os.path.basename(str(tiny_model_dir))
    finally:
        srv.stop()


def test_question_limit_and_a_client_that_does_not_read(server, frames):
    """A burst of questions over a WebSocket whose client reads nothing meanwhile: over the per-session limit
    they get 429's code; the others are answered; another session ingests and answers meanwhile."""
    sid = _fed_session(server, frames, 3)
    other = _fed_session(server, frames, 1)

    async def burst():
        async with websockets.connect(f"{server.ws_url}/v1/sessions/{sid}/ws?api_key={KEY}") as ws:
            await _recv(ws)
            for i in range(10):
                await ws.send(json.dumps({"type": "response.create", "question": "and now?", "response_id": f"b{i}",
                                          "max_tokens": 16}))
            # not reading: the server neither waits for this client nor holds up another session
            r = await asyncio.to_thread(server.push, other, frames[1], 1.0)
            assert r.status_code == 200 and r.json()["frames_seen"] == 2
            r = await asyncio.to_thread(server.post, f"/v1/sessions/{other}/questions",
                                        json={"question": "fine?", "max_tokens": 2})
            assert r.status_code == 200
            outcome = {}
            while len(outcome) < 10:
                event = await _recv(ws)
                if event["type"] in ("response.done", "error"):
                    outcome[event["response_id"]] = event.get("code", "done")
            return outcome

    outcome = asyncio.run(burst())
    codes = sorted(outcome.values())
    assert set(codes) == {"done", "too_many_questions"}, outcome
    for s in (sid, other):
        server.delete(f"/v1/sessions/{s}")
