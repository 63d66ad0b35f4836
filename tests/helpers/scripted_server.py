"""An OpenAI-compatible server on 127.0.0.1 whose every chat answer is one fixed text, streamed a few
characters at a time: for the front-end tests that must see exactly what a model wrote (code, markdown)
and every partial state of it on the way, and what they say when a server refuses a request or an answer
breaks off."""

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "scripted"
# Code as models write it, without a fence and with one, around prose that names identifiers.
CODE_ANSWER = (
    "Use __init__ to set up an object, as in snake_case_names:\n\n"
    "class Reader:\n"
    "    # set up the _private state\n"
    "    def __init__(self, file_name):\n"
    "        self._file = file_name\n"
    "\n"
    "Or with a fence:\n\n"
    "```python\n"
    "# read it all\n"
    "def read_all(path_name):\n"
    "    return open(path_name).read()\n"
    "```\n"
    "That is `__init__` and *emphasis*.\n"
)


def _handler(answer: str, chunk_chars: int, pause: float, refuse: str | None, break_off: str | None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _json(self, body: dict, status: int = 200) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/").endswith("/models"):
                self._json(
                    {
                        "object": "list",
                        "data": [
                            {"id": MODEL, "object": "model", "created": 0, "owned_by": "tests", "max_model_len": 4096}
                        ],
                    }
                )
            else:
                self.send_error(404)

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.endswith("/tokenize"):
                self._json({"count": 12, "tokens": [], "max_model_len": 4096})
            elif self.path.endswith("/chat/completions") and refuse is not None:
                self._json(
                    {"error": {"message": refuse, "type": "invalid_request_error", "param": None, "code": None}},
                    status=400,
                )
            elif self.path.endswith("/chat/completions"):
                self._stream()
            else:
                self.send_error(404)

        def _stream(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            pieces = [answer[i : i + chunk_chars] for i in range(0, len(answer), chunk_chars)]
            for index, piece in enumerate(pieces + [None]):
                if break_off is not None and index == len(pieces) // 2:  # as clex-serve ends a failed stream
                    self._event(
                        json.dumps(
                            {"error": {"message": break_off, "type": "server_error", "param": None, "code": None}}
                        )
                    )
                    break
                delta = {"content": piece} if piece is not None else {}
                chunk = {
                    "id": "chatcmpl-scripted",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": MODEL,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None if piece else "stop"}],
                }
                self._event(json.dumps(chunk))
                time.sleep(pause)
            self._event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")

        def _event(self, data: str) -> None:
            payload = f"data: {data}\n\n".encode()
            self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            self.wfile.flush()

    return Handler


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that closes its connection (a stopped answer) is not a failure here


@contextmanager
def scripted_server(
    answer: str, chunk_chars: int = 3, pause: float = 0.01, refuse: str | None = None, break_off: str | None = None
):
    """Yields the server's base URL (ending in /v1). ``refuse``: every chat request gets a 400 with this
    message; ``break_off``: half way through, the answer ends with an error event with this message."""
    server = _QuietServer(("127.0.0.1", 0), _handler(answer, chunk_chars, pause, refuse, break_off))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
