"""Helpers of the server tests (no tests here): start the real server process, talk to it, make frames.

Imported by the other tests/serve/test_server*.py files as `serve.test_server_support`.
"""

import base64
import io
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time

import requests

from support import REPO

START_TIMEOUT_S = 120.0


class RunningServer:
    """`python -m flash_vstream.serve.server ... --port 0` in a subprocess; `url` once it printed its
    `listening on` line. stderr goes to a file (`log()`), so a chatty server never blocks on a pipe."""

    def __init__(self, model_dir, *args, key=None, log_dir, command=None, env=None):
        self.key = key
        self.log_path = os.path.join(str(log_dir), f"server-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "w")
        cmd = command or [sys.executable, "-m", "flash_vstream.serve.server", "--model-path", str(model_dir),
                          "--port", "0", *(["--api-key", key] if key else []), *map(str, args)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   **(env or {}))
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        self.url = None
        while self.url is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise AssertionError(f"the server did not start in {START_TIMEOUT_S} s:\n{self.log()}") from None
            if line.startswith("listening on "):
                self.url = line.split()[-1].strip()
            elif self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
        self.http = requests.Session()
        if key:
            self.http.headers["Authorization"] = f"Bearer {key}"

    @property
    def ws_url(self):
        return self.url.replace("http://", "ws://", 1)

    def get(self, path, **kw):
        return self.http.get(self.url + path, timeout=60, **kw)

    def post(self, path, **kw):
        return self.http.post(self.url + path, timeout=120, **kw)

    def delete(self, path, **kw):
        return self.http.delete(self.url + path, timeout=60, **kw)

    def session(self, source=None, fps=1.0):
        r = self.post("/v1/sessions", json={"source": source or {"type": "push"}, "fps": fps})
        assert r.status_code == 201, r.text
        return r.json()

    def push(self, session_id, jpeg, timestamp):
        return self.post(f"/v1/sessions/{session_id}/frames", params={"timestamp": timestamp}, data=jpeg,
                         headers={"Content-Type": "image/jpeg"})

    def wait_state(self, session_id, states, timeout=60.0):
        deadline = time.monotonic() + timeout
        while True:
            body = self.get(f"/v1/sessions/{session_id}").json()
            if body["state"] in states or time.monotonic() > deadline:
                return body
            time.sleep(0.1)

    def log(self):
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def assert_error(response, status, code=None):
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str), body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def jpeg_frames(path, n=6, size=(96, 72), fps=1.0):
    """The first `n` frames of a video at `fps`, shrunk to `size`, as JPEG bytes."""
    from PIL import Image

    from flash_vstream.video_io import iter_frames

    out = []
    for frame, _ in iter_frames(path, fps=fps):
        buf = io.BytesIO()
        Image.fromarray(frame).resize(size).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
        if len(out) == n:
            break
    return out


def data_url(data, mime="image/jpeg"):
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def need_tool(name):
    """The tests that need a system tool fail (not skip) without it, saying how to install it."""
    path = shutil.which(name)
    assert path, (f"`{name}` is not on PATH: these tests need it (Debian: apt-get install -y chromium ffmpeg; "
                  ".ci/run installs both)")
    return path


class RTSPRelay:
    """A minimal RTSP server for the tests: ffmpeg's RTSP muxer only publishes (it cannot listen for players),
    so this takes one publisher (`ffmpeg ... -f rtsp -rtsp_transport tcp URL`: ANNOUNCE, SETUP, RECORD) and
    any number of players (DESCRIBE, SETUP -- UDP is refused with 461, players then retry over TCP --, PLAY),
    and copies the publisher's interleaved RTP/RTCP packets to every player. When the publisher goes away
    its players are disconnected, as a real server's are when the camera dies."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sdp = None
        self.players = []
        self.lock = threading.Lock()
        self.announced = threading.Event()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path="live"):
        return f"rtsp://127.0.0.1:{self.port}/{path}"

    def close(self):
        self.closed = True
        self.sock.close()
        self._drop_players()

    def _drop_players(self):
        with self.lock:
            players, self.players = self.players, []
        for player in players:
            try:
                player.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            player.close()

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf = b""
        publisher = False
        try:
            while True:
                while len(buf) < 4 or (buf[:1] != b"$" and b"\r\n\r\n" not in buf):
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                if buf[:1] == b"$":  # interleaved binary frame: $ channel length(2) payload
                    size = int.from_bytes(buf[2:4], "big")
                    while len(buf) < 4 + size:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    frame, buf = buf[:4 + size], buf[4 + size:]
                    if publisher:
                        self._broadcast(frame)
                    continue
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, url = lines[0].split()[:2]
                headers = {name.strip().lower(): value.strip()
                           for name, _, value in (line.partition(":") for line in lines[1:])}
                length = int(headers.get("content-length", 0))
                while len(buf) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                cseq = headers.get("cseq", "0")
                extra, content = {}, b""
                status = "200 OK"
                if method == "OPTIONS":
                    extra["Public"] = "OPTIONS, DESCRIBE, ANNOUNCE, SETUP, PLAY, RECORD, TEARDOWN, GET_PARAMETER"
                elif method == "ANNOUNCE":
                    self.sdp = body
                    publisher = True
                elif method == "DESCRIBE":
                    if not self.announced.wait(10) or self.sdp is None:
                        status = "404 Not Found"
                    else:
                        content = self.sdp
                        extra["Content-Type"] = "application/sdp"
                        extra["Content-Base"] = url.rstrip("/") + "/"
                elif method == "SETUP":
                    transport = headers.get("transport", "")
                    if "TCP" not in transport.upper():
                        status = "461 Unsupported Transport"  # players retry over TCP
                    else:
                        extra["Transport"] = transport
                        extra["Session"] = "12345678"
                elif method == "RECORD":
                    extra["Session"] = "12345678"
                    self.announced.set()
                elif method == "PLAY":
                    extra["Session"] = "12345678"
                reply = f"RTSP/1.0 {status}\r\nCSeq: {cseq}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                reply += f"Content-Length: {len(content)}\r\n\r\n"
                conn.sendall(reply.encode("latin-1") + content)
                if method == "PLAY" and status.startswith("200"):
                    with self.lock:
                        self.players.append(conn)
                if method == "TEARDOWN":
                    return
        except OSError:
            pass
        finally:
            if publisher:
                self.announced.clear()
                self.sdp = None
                self._drop_players()
            with self.lock:
                if conn in self.players:
                    self.players.remove(conn)
            conn.close()

    def _broadcast(self, frame):
        with self.lock:
            players = list(self.players)
        for player in players:
            try:
                player.sendall(frame)
            except OSError:
                with self.lock:
                    if player in self.players:
                        self.players.remove(player)
