"""Sessions that read their own source, for real over loopback: a file played in stream time, an HLS stream
from a local HTTP server, an RTSP stream published by a local ffmpeg and a live HTTP stream served by one,
each dying mid-stream (its session fails with the reason, the server goes on). ffmpeg must be installed:
these tests fail without it."""

import functools
import http.server
import socket
import subprocess
import threading
import time

import pytest

from serve.test_server_support import RTSPRelay, RunningServer, jpeg_frames, need_tool


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ffmpeg():
    return need_tool("ffmpeg")


@pytest.fixture(scope="module")
def media_root(tmp_path_factory, make_video):
    root = tmp_path_factory.mktemp("media")
    make_video(root / "four.mp4", n=40, rate=10)  # 4 s: frames at 0, 1, 2, 3 s
    (root / "broken.mp4").write_bytes(b"this is not a video" * 100)
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir, media_root, tmp_path_factory):
    srv = RunningServer(tiny_model_dir, "--media-root", media_root, "--allow-remote-sources", "--max-tokens", 8,
                        log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def hls_url(ffmpeg, example_mp4, tmp_path_factory):
    """example.mp4's first 6 s as an HLS playlist of 1 s segments, served by a local HTTP server."""
    folder = tmp_path_factory.mktemp("hls")
    subprocess.run([ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-i", example_mp4, "-t", "6", "-an",
                    "-vf", "scale=160:120", "-c:v", "libx264", "-g", "10", "-hls_time", "1", "-hls_list_size", "0",
                    "-f", "hls", str(folder / "stream.m3u8")], check=True, timeout=120)
    handler = functools.partial(_QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/stream.m3u8"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_file_session_plays_in_stream_time(server):
    began = time.monotonic()
    sid = server.session({"type": "file", "path": "four.mp4", "play_speed": 1.0})["id"]
    time.sleep(1.0)
    early = server.get(f"/v1/sessions/{sid}").json()
    assert early["state"] == "running" and early["frames_seen"] < 4
    done = server.wait_state(sid, ("ended", "failed"))
    assert (done["state"], done["frames_seen"], done["stream_time"], done["error"]) == ("ended", 4, 3.0, None)
    assert time.monotonic() - began >= 2.5  # frame 3 s was due 3 s after frame 0
    answer = server.post(f"/v1/sessions/{sid}/questions", json={"question": "what was shown?", "max_tokens": 4})
    assert answer.status_code == 200 and answer.json()["frames_seen"] == 4  # an ended stream still answers
    server.delete(f"/v1/sessions/{sid}")

    fast = server.session({"type": "file", "path": "four.mp4", "play_speed": 0})["id"]
    assert server.wait_state(fast, ("ended", "failed"), timeout=30)["frames_seen"] == 4
    server.delete(f"/v1/sessions/{fast}")


def test_undecodable_file_fails_its_session(server):
    sid = server.session({"type": "file", "path": "broken.mp4", "play_speed": 0})["id"]
    failed = server.wait_state(sid, ("ended", "failed"))
    assert failed["state"] == "failed" and "broken.mp4" in failed["error"]
    server.delete(f"/v1/sessions/{sid}")


def test_hls_stream_from_a_local_http_server(server, hls_url):
    sid = server.session({"type": "url", "url": hls_url, "live": False})["id"]
    done = server.wait_state(sid, ("ended", "failed"))
    assert (done["state"], done["error"]) == ("ended", None) and done["frames_seen"] >= 5
    answer = server.post(f"/v1/sessions/{sid}/questions", json={"question": "describe it.", "max_tokens": 4})
    assert answer.status_code == 200
    server.delete(f"/v1/sessions/{sid}")


def test_live_http_stream_dying_mid_stream_fails_its_session(server, ffmpeg, example_mp4):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/live.ts"
    proc = subprocess.Popen([ffmpeg, "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i",
                             example_mp4, "-an", "-vf", "scale=160:120", "-c:v", "libx264", "-g", "10", "-f", "mpegts",
                             "-listen", "1", url], stdin=subprocess.DEVNULL)
    try:
        bystander = server.session()["id"]
        frames = jpeg_frames(example_mp4, n=4)
        deadline = time.monotonic() + 20
        while True:  # ffmpeg listens once its input is open
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "ffmpeg did not start listening"
                time.sleep(0.1)
        # that probe took ffmpeg's one connection; it listens again only after a restart, so start over
        proc.kill()
        proc.wait()
        proc = subprocess.Popen(proc.args, stdin=subprocess.DEVNULL)
        time.sleep(0.5)
        sid = server.session({"type": "url", "url": url})["id"]
        deadline = time.monotonic() + 30
        while server.get(f"/v1/sessions/{sid}").json()["frames_seen"] < 2:
            assert time.monotonic() < deadline, server.get(f"/v1/sessions/{sid}").json()
            time.sleep(0.1)
        proc.kill()  # the source dies mid-stream
        failed = server.wait_state(sid, ("ended", "failed"), timeout=40)
        assert failed["state"] == "failed" and "stopped" in failed["error"], failed
        # the server goes on: another session ingests and answers
        for i, jpeg in enumerate(frames):
            assert server.push(bystander, jpeg, float(i)).json()["frames_seen"] == i + 1
        assert server.post(f"/v1/sessions/{bystander}/questions", json={"question": "ok?"}).status_code == 200
        # the failed session keeps its memory for questions until it is deleted
        assert server.post(f"/v1/sessions/{sid}/questions", json={"question": "what did you see?"}).status_code == 200
        for s in (sid, bystander):
            server.delete(f"/v1/sessions/{s}")
    finally:
        proc.kill()
        proc.wait()


def test_rtsp_stream_from_ffmpeg_dying_mid_stream_fails_its_session(server, ffmpeg, example_mp4):
    relay = RTSPRelay()
    proc = subprocess.Popen([ffmpeg, "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i",
                             example_mp4, "-an", "-vf", "scale=160:120", "-c:v", "libx264", "-g", "10", "-f", "rtsp",
                             "-rtsp_transport", "tcp", relay.url()], stdin=subprocess.DEVNULL)
    try:
        assert relay.announced.wait(30), "ffmpeg did not publish the RTSP stream"
        sid = server.session({"type": "url", "url": relay.url()})["id"]
        deadline = time.monotonic() + 30
        while (seen := server.get(f"/v1/sessions/{sid}").json())["frames_seen"] < 2:
            assert time.monotonic() < deadline and seen["state"] == "running", seen
            time.sleep(0.1)
        answer = server.post(f"/v1/sessions/{sid}/questions", json={"question": "live?", "max_tokens": 4})
        assert answer.status_code == 200 and answer.json()["frames_seen"] >= 2
        proc.kill()  # the camera dies
        failed = server.wait_state(sid, ("ended", "failed"), timeout=40)
        assert failed["state"] == "failed" and "stopped" in failed["error"], failed
        assert server.get("/health").json() == {"status": "ok"}
        server.delete(f"/v1/sessions/{sid}")
    finally:
        proc.kill()
        proc.wait()
        relay.close()
