"""`/v1/sessions/{id}/ws`: frames in, questions in, answers streamed out, on one connection.

Client events: `input_image.append`, `response.create`, `session.close`. Server events:
`session.created` (on connect), `response.output_text.delta`, `response.done`, `error` (the connection
stays open after a bad event). The handshake needs the key (`Authorization: Bearer` or `?api_key=`);
a refused handshake is answered with the HTTP status and the JSON error body.

One receiver reads the client's events in order; one sender writes the server's events, each write
bounded by SEND_TIMEOUT_S: a client that stops reading is disconnected, and nothing else waits for it
(the answer lane only queues deltas). A client that goes away cancels its answers in flight.
"""

import asyncio
import itertools
import json
import logging
import time

from fastapi import WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from . import inputs
from .app import answer_fields, bearer, key_matches, question_args
from .scheduler import SessionError

SEND_TIMEOUT_S = 10.0
logger = logging.getLogger("flash_vstream.serve")


async def deny(websocket, status, code, message):
    body = JSONResponse({"error": {"code": code, "message": message}}, status_code=status)
    try:
        await websocket.send_denial_response(body)
    except RuntimeError:  # the server has no denial-response extension: close before accepting
        await websocket.close(code=4000 + status, reason=code)


def add_websocket_route(app, state):
    @app.websocket("/v1/sessions/{session_id}/ws")
    async def session_socket(websocket: WebSocket, session_id: str):
        presented = bearer(websocket.headers) or websocket.query_params.get("api_key")
        if not key_matches(state, presented):
            return await deny(websocket, 401, "unauthorized", "a valid key is needed (Authorization: Bearer "
                              "<key>, or ?api_key=<key>)")
        if not state.ready.is_set():
            return await deny(websocket, 503, "not_ready", "the model is still loading")
        try:
            session = state.engine.get(session_id)
        except SessionError as e:
            return await deny(websocket, e.status, e.code, e.message)
        await websocket.accept()
        await _Connection(state, session, websocket).run()


class _Connection:
    def __init__(self, state, session, websocket):
        self.state, self.engine, self.session, self.ws = state, state.engine, session, websocket
        self.outbox = asyncio.Queue()  # bounded in practice: pending questions x max_tokens deltas
        self.jobs = {}  # response_id -> QuestionJob in flight
        self.tasks = set()
        self.ids = itertools.count(1)
        self.loop = asyncio.get_running_loop()

    def send(self, event):
        self.outbox.put_nowait(event)

    def error(self, code, message, response_id=None):
        event = {"type": "error", "code": code, "message": message}
        if response_id is not None:
            event["response_id"] = response_id
        self.send(event)

    async def run(self):
        self.engine.connect(self.session, +1)
        sender = asyncio.create_task(self._sender())
        self.send({"type": "session.created", "session": self.session.describe()})
        try:
            await self._receive(sender)
        finally:
            self.engine.connect(self.session, -1)
            for job in self.jobs.values():
                job.cancelled.set()  # the client is gone: its answers stop early
            for task in self.tasks:
                task.cancel()
            sender.cancel()
            try:
                await self.ws.close()
            except RuntimeError:
                pass  # already closed

    async def _sender(self):
        try:
            while True:
                event = await self.outbox.get()
                await asyncio.wait_for(self.ws.send_text(json.dumps(event)), SEND_TIMEOUT_S)
        except asyncio.TimeoutError:
            logger.warning("session %s: a WebSocket client stopped reading; disconnecting it", self.session.id)
            for job in self.jobs.values():
                job.cancelled.set()
            await self.ws.close(code=1008, reason="client too slow")
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass

    async def _receive(self, sender):
        while True:
            receive = asyncio.create_task(self.ws.receive())
            done, _ = await asyncio.wait({receive, sender}, return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:  # the sender gave up on the client
                receive.cancel()
                return
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                raw = (message.get("bytes") or b"").decode("utf-8", "replace")
            try:
                event = json.loads(raw)
            except ValueError as e:
                self.error("invalid_json", f"the message is not valid JSON: {e}")
                continue
            if not isinstance(event, dict):
                self.error("invalid_event", "an event must be a JSON object with a 'type'")
                continue
            kind = event.get("type")
            try:
                if kind == "input_image.append":
                    await self._append(event)
                elif kind == "response.create":
                    self._create_response(event)
                elif kind == "session.close":
                    await asyncio.to_thread(self.engine.delete, self.session.id)
                    return
                else:
                    self.error("unknown_event", f"unknown event type {kind!r}; known: input_image.append, "
                               "response.create, session.close")
            except SessionError as e:
                self.error(e.code, e.message, event.get("response_id") if kind == "response.create" else None)

    async def _append(self, event):
        arrived = time.perf_counter()  # the frame's ingest lag counts from here
        s = self.state.settings
        image = event.get("image")
        if not isinstance(image, str):
            raise SessionError(400, "invalid_request", "'image' must be a data URL string")
        timestamp = inputs.number(event.get("timestamp"), "timestamp", 0)
        _, data = inputs.decode_data_url(image, s.max_frame_bytes, ("image/",))
        frame = await asyncio.to_thread(inputs.decode_image, data, s.max_frame_bytes)
        self.engine.push_frame(self.session, frame, timestamp, arrived=arrived)

    def _create_response(self, event):
        response_id = event.get("response_id")
        if response_id is None:
            response_id = f"resp_{next(self.ids)}"
        if not isinstance(response_id, str) or len(response_id) > 128:
            raise SessionError(400, "invalid_request", "'response_id' must be a string of at most 128 characters")
        if response_id in self.jobs:
            raise SessionError(409, "duplicate_response_id", f"response {response_id!r} is still running")
        question, max_tokens, temperature = question_args(self.state, event)

        def on_text(piece):  # on the answer lane's thread
            self.loop.call_soon_threadsafe(self.send, {"type": "response.output_text.delta",
                                                       "response_id": response_id, "delta": piece})

        job = self.engine.ask(self.session, question, max_tokens, temperature, on_text=on_text)
        self.jobs[response_id] = job
        task = asyncio.create_task(self._finish(response_id, job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _finish(self, response_id, job):
        try:
            result = await asyncio.wrap_future(job.future)
            self.send({"type": "response.done", "response_id": response_id, "text": result.answer.text,
                       **answer_fields(result)})
        except SessionError as e:
            self.error(e.code, e.message, response_id)
        except Exception as e:  # noqa: BLE001 - the model failed on this question: say so, keep the socket
            self.error("answer_failed", f"{type(e).__name__}: {e}", response_id)
        finally:
            self.jobs.pop(response_id, None)
