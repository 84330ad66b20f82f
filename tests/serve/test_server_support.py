"""Helpers of the server tests (no tests here): start the real server process, talk to it, make frames.

Imported by the other tests/serve/test_server*.py files as `serve.test_server_support`.
"""

import base64
import io
import os
import queue
import shutil
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
