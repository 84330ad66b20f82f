"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for tests.

The test passes a `script(request) -> Reply` function. Requests arrive concurrently and in
any order, so a script decides from the request's content (e.g. the predicted answer inside
the user message) and `request.attempt`: how many earlier requests carried the same user
message. Both OpenAI (`/v1/chat/completions`) and Azure
(`/openai/deployments/<name>/chat/completions?api-version=...`) paths are served.
"""

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    status: int = 200
    content: str | None = None    # assistant message text (status 200)
    body: dict | None = None      # error body (status != 200)
    delay: float = 0.0            # seconds to wait before answering (client timeouts)
    drop: bool = False            # close the connection without an answer
    headers: dict = field(default_factory=dict)

    @classmethod
    def text(cls, content):
        return cls(content=content)

    @classmethod
    def error(cls, status, message="scripted error", headers=None):
        return cls(status=status, body={"error": {"message": message, "type": "scripted", "code": status}},
                   headers=headers or {})

    @classmethod
    def hang(cls, seconds, content="{'pred': 'no', 'score': 0}"):
        return cls(content=content, delay=seconds)

    @classmethod
    def dropped(cls):
        return cls(drop=True)


@dataclass
class Request:
    path: str
    headers: dict                 # lower-cased names
    body: dict
    attempt: int

    @property
    def user(self):
        return [m["content"] for m in self.body.get("messages", []) if m["role"] == "user"][-1]

    @property
    def system(self):
        return [m["content"] for m in self.body.get("messages", []) if m["role"] == "system"][0]


class FakeOpenAIServer:
    """`with FakeOpenAIServer(script) as srv:` -> `srv.base_url`, `srv.requests`."""

    def __init__(self, script):
        self.script = script
        self.requests: list[Request] = []
        self.in_flight = self.max_in_flight = 0   # concurrent requests, now and at most
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw or b"{}")
                users = [m["content"] for m in body.get("messages", []) if m.get("role") == "user"]
                with server._lock:
                    key = users[-1] if users else ""
                    attempt = server._seen.get(key, 0)
                    server._seen[key] = attempt + 1
                    req = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body, attempt)
                    server.requests.append(req)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                answer = self._answer(req, body)
                with server._lock:  # counted as done before the client can see the answer
                    server.in_flight -= 1
                if answer is None:
                    self.close_connection = True
                else:
                    self._send(*answer)

            def _answer(self, req, body):
                """(status, payload, headers), or None to close the connection unanswered."""
                if not self.path.split("?")[0].endswith("/chat/completions"):
                    return 404, {"error": {"message": "not found"}}, {}
                reply = server.script(req)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.drop:
                    return None
                if reply.status != 200:
                    return reply.status, reply.body or {}, reply.headers
                completion = {
                    "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion",
                    "created": int(time.time()), "model": body.get("model", ""),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply.content}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                return 200, completion, reply.headers

            def _send(self, status, payload, headers):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out first
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def root_url(self):
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
