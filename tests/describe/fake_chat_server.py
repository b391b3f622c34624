"""A real OpenAI-compatible chat server on 127.0.0.1 for tests and benches: deterministic answers, a log,
latency and faults on demand.

    with FakeChatServer(latency_s=0.05) as server:        # a free port; server.url ends in /v1
        server.fault("429:1", "500", "reset")            # consumed, in order, by the next requests
        server.fault_for("Laysan", "malformed")          # by the next request whose prompt contains it
        ...; server.log                                  # prompts asked, in order of arrival
        server.answered; server.expected(prompt)         # prompts answered (200 sent); the answer to one

``POST /v1/chat/completions`` and ``GET /v1/models``. The prompt of a request is the text of its last
user message; the answer is ``answer(prompt)`` (default: a function of its sha256), usage counts words.
Faults: ``429`` / ``503`` (``:S`` sends ``Retry-After: S``, seconds or an HTTP date), ``500``, ``401``,
``hang`` (no answer for ``hang_s``), ``reset`` (the connection closed without a response), ``malformed``
(a body that is not JSON), ``empty`` (content ""), ``refusal`` ("I'm sorry, I can't help with that."),
``content_filter`` (finish_reason content_filter).
"""

from __future__ import annotations

import collections
import hashlib
import json
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

FAULTS = ("429", "503", "500", "401", "hang", "reset", "malformed", "empty", "refusal", "content_filter")
REFUSAL = "I'm sorry, I can't help with that."


def default_answer(prompt: str) -> str:
    return f"answer {hashlib.sha256(prompt.encode()).hexdigest()[:16]}"


def prompt_of(body: dict) -> str:
    """The text of the last user message (text parts joined; images as <image>)."""
    users = [m for m in body.get("messages", []) if isinstance(m, dict) and m.get("role") == "user"]
    content = users[-1].get("content", "") if users else ""
    if isinstance(content, list):
        return " ".join(p.get("text", "") if p.get("type") == "text" else "<image>" for p in content)
    return str(content)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many clients connect at once

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client gone is no error
            super().handle_error(request, client_address)


class FakeChatServer:
    def __init__(self, answer: Callable[[str], str] = default_answer, *, latency_s: float = 0.0,
                 model: str = "fake-model", api_key: str | None = None, hang_s: float = 5.0,
                 on_request: Callable[[int, str], None] | None = None):
        self.answer, self.latency_s, self.model, self.api_key, self.hang_s = answer, latency_s, model, api_key, hang_s
        self.on_request = on_request  # called with (index in log, prompt) before the answer is made
        self.log: list[str] = []
        self.answered: list[str] = []
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0  # requests being answered at once, at most
        self._faults: collections.deque[str] = collections.deque()
        self._keyed: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server: _Server | None = None

    # ---------------------------------------------------------------------------------- control
    def fault(self, *faults: str) -> None:
        """Faults for the next requests, one each, in order."""
        with self._lock:
            self._faults.extend(_checked(f) for f in faults)

    def fault_for(self, substring: str, *faults: str) -> None:
        """Faults for the next requests whose prompt contains ``substring``, one each."""
        with self._lock:
            self._keyed.extend((substring, _checked(f)) for f in faults)

    def expected(self, prompt: str) -> str:
        return self.answer(prompt)

    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()
            self.answered.clear()
            self.bodies.clear()
            self.max_in_flight = 0

    @property
    def port(self) -> int:
        assert self._server is not None, "the server is not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FakeChatServer":
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def close(self) -> None:
        self._closing.set()  # releases hanging requests
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeChatServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- serving
    def _take_fault(self, prompt: str) -> str | None:
        with self._lock:
            for i, (substring, fault) in enumerate(self._keyed):
                if substring in prompt:
                    del self._keyed[i]
                    return fault
            return self._faults.popleft() if self._faults else None

    def _completion(self, body: dict, content: str, finish_reason: str = "stop") -> dict:
        prompt = prompt_of(body)
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": finish_reason}],
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split()),
                          "total_tokens": len(prompt.split()) + len(content.split())}}


def _checked(fault: str) -> str:
    if fault.split(":", 1)[0] not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; known: {FAULTS}")
    return fault


def _handler(server: FakeChatServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

        def log_message(self, *args):
            pass

        def _send(self, status: int, payload, headers: dict | None = None) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, headers: dict | None = None) -> None:
            self._send(status, {"error": {"message": message, "type": "fake", "code": status}}, headers)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):
            with server._lock:
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                self._post()
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                self.close_connection = True  # the client went away (a timeout, a killed process)
            finally:
                with server._lock:
                    server.in_flight -= 1

        def _post(self):
            body_bytes = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}")
            if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                return self._error(401, "invalid api key")
            try:
                body = json.loads(body_bytes)
            except ValueError:
                return self._error(400, "the request body is not JSON")
            if body.get("model") != server.model:
                return self._error(404, f"model {body.get('model')!r} not found")
            prompt = prompt_of(body)
            with server._lock:
                index = len(server.log)
                server.log.append(prompt)
                server.bodies.append(body)
            if server.on_request is not None:
                server.on_request(index, prompt)
            fault = server._take_fault(prompt)
            if server.latency_s:
                time.sleep(server.latency_s)
            kind, _, arg = (fault or "").partition(":")
            if kind in ("429", "503"):
                return self._error(int(kind), "slow down" if kind == "429" else "overloaded",
                                   {"Retry-After": arg} if arg else None)
            if kind in ("500", "401"):
                return self._error(int(kind), "boom" if kind == "500" else "invalid api key")
            if kind == "hang":
                server._closing.wait(server.hang_s)
                self.close_connection = True
                return
            if kind == "reset":  # RST: close with SO_LINGER 0, no response
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            if kind == "malformed":
                return self._send(200, b'{"id": "chatcmpl-fake", "choices": [{"message": ')
            if kind == "empty":
                return self._send(200, server._completion(body, ""))
            if kind == "refusal":
                return self._send(200, server._completion(body, REFUSAL))
            if kind == "content_filter":
                return self._send(200, server._completion(body, "", "content_filter"))
            self._send(200, server._completion(body, server.answer(prompt)))
            with server._lock:
                server.answered.append(prompt)

    return Handler
