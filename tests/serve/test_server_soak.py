"""200 sessions opened and closed (with frames, questions, WebSockets and file sources): the server process's
threads, open files and memory return to where they were."""

import asyncio
import concurrent.futures
import json
import os

import pytest
import websockets

from serve.test_server_support import RunningServer, data_url, jpeg_frames

SESSIONS = 200
WORKERS = 4


def _process_usage(pid):
    """(threads, open file descriptors, RSS bytes) of a Linux process."""
    threads = len(os.listdir(f"/proc/{pid}/task"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return threads, fds, rss


def _one_session(server, frames, i):
    if i % 20 == 7:  # a file source: its reader thread must go with the session
        sid = server.session({"type": "file", "path": "clip.mp4", "play_speed": 0})["id"]
        assert server.wait_state(sid, ("ended", "failed"))["state"] == "ended"
    elif i % 10 == 3:  # over the WebSocket
        sid = server.session()["id"]

        async def talk():
            async with websockets.connect(f"{server.ws_url}/v1/sessions/{sid}/ws") as ws:
                await ws.recv()
                for k in range(2):
                    await ws.send(json.dumps({"type": "input_image.append", "image": data_url(frames[k]),
                                              "timestamp": float(k)}))
                await ws.send(json.dumps({"type": "response.create", "question": "hi", "max_tokens": 2}))
                while json.loads(await ws.recv())["type"] not in ("response.done", "error"):
                    pass
                if i % 20 == 3:
                    await ws.send(json.dumps({"type": "session.close"}))  # the server deletes it
                    return True
            return False

        if asyncio.run(talk()):
            return
    else:
        sid = server.session()["id"]
        for k in range(2):
            assert server.push(sid, frames[k], float(k)).status_code == 200
    r = server.post(f"/v1/sessions/{sid}/questions", json={"question": "what is it?", "max_tokens": 2})
    assert r.status_code in (200, 409), r.text  # 409: the WebSocket's frames were not in yet
    assert server.delete(f"/v1/sessions/{sid}").status_code == 200


def _run(server, frames, indices):
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        for future in [pool.submit(_one_session, server, frames, i) for i in indices]:
            future.result()


@pytest.mark.slow
def test_200_sessions_leave_nothing_behind(tiny_model_dir, example_mp4, make_video, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    make_video(media / "clip.mp4", n=30, rate=10)
    frames = jpeg_frames(example_mp4, n=2)
    server = RunningServer(tiny_model_dir, "--media-root", media, "--max-tokens", 4, "--max-sessions", 8,
                           log_dir=tmp_path)
    try:
        _run(server, frames, range(40))  # warm-up: lazy allocations, the thread pools at their working size
        before = _process_usage(server.proc.pid)
        _run(server, frames, range(SESSIONS))
        assert server.get("/v1/sessions").json()["data"] == []
        after = _process_usage(server.proc.pid)
        print(f"threads, fds, RSS before {before}, after {SESSIONS} sessions {after}")
        threads, fds, rss = (b - a for a, b in zip(before, after))
        assert threads <= 0, (before, after)
        assert fds <= 2, (before, after)  # a keep-alive socket may be open at either moment
        assert rss < 64 * 2**20, (before, after)  # 200 sessions' memories (681 x 32 floats each) are not kept
        metrics = server.get("/metrics").text
        assert 'flash_vstream_sessions{state="running"} 0.0' in metrics
    finally:
        server.stop()


@pytest.mark.slow
def test_idle_sessions_are_closed(tiny_model_dir, example_mp4, tmp_path):
    """--idle-timeout: a session nobody sends to, asks or watches is closed; one with a WebSocket open is not."""
    frames = jpeg_frames(example_mp4, n=1)
    server = RunningServer(tiny_model_dir, "--idle-timeout", 1.0, log_dir=tmp_path)
    try:
        idle = server.session()["id"]
        watched = server.session()["id"]
        assert server.push(idle, frames[0], 0.0).status_code == 200

        async def watch():
            async with websockets.connect(f"{server.ws_url}/v1/sessions/{watched}/ws") as ws:
                await ws.recv()
                for _ in range(40):
                    await asyncio.sleep(0.1)
                    if server.http.get(f"{server.url}/v1/sessions/{idle}", timeout=10).status_code == 404:
                        break
                await asyncio.sleep(0.5)

        asyncio.run(watch())
        assert server.get(f"/v1/sessions/{idle}").status_code == 404
        assert server.get(f"/v1/sessions/{watched}").status_code == 200
    finally:
        server.stop()
