"""The server side of the OpenAI chat-completions wire format: a small threaded HTTP server that
answers POST /v1/chat/completions with what a Python function returns. Tests start real expert
servers on 127.0.0.1 with it, and `python toyworld.py serve` serves the toy experts over HTTP."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 makes bursts of clients wait 1 s for a SYN retry

    def handle_error(self, request, client_address):
        pass  # clients that time out and hang up are expected (tests, fault injection)


class OpenAICompatServer:
    """POST /v1/chat/completions and GET /v1/models on a ThreadingHTTPServer.

    respond(request_json) returns
      str                     -> wrapped into a completion with usage (whitespace token counts)
      dict                    -> sent as the JSON body as-is (e.g. broken completions)
      (status, body, headers) -> body is str/bytes (sent raw) or dict (sent as JSON)
    The request dict also carries the HTTP request headers under "_headers" (tests check e.g.
    Authorization). An exception in respond becomes HTTP 500. Connections close after each response (HTTP/1.0),
    so stop() leaves no open sockets behind.
    """

    def __init__(self, respond: Callable[[dict], object], host="127.0.0.1", port=0, model_names=("served",)):
        self.respond = respond
        self.model_names = tuple(model_names)
        self.httpd = _QuietServer((host, port), self._handler_class())
        self.url = f"http://{host}:{self.httpd.server_address[1]}/v1"
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True, name=f"server {self.url}")
        self._thread.start()
        return self

    def stop(self):
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):
                pass

            def send(self, status, body, headers=None):
                if isinstance(body, (dict, list)):
                    body = json.dumps(body)
                body = body.encode() if isinstance(body, str) else body
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, str(value))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self.send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in server.model_names]})
                else:
                    self.send(404, {"error": f"no route GET {self.path}"})

            def do_POST(self):
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self.send(404, {"error": f"no route POST {self.path}"})
                try:
                    request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                except ValueError:
                    return self.send(400, {"error": "request body is not JSON"})
                request["_headers"] = dict(self.headers)  # lets tests inspect e.g. Authorization
                try:
                    result = server.respond(request)
                except Exception as exc:
                    return self.send(500, {"error": f"{type(exc).__name__}: {exc}"})
                if isinstance(result, tuple):
                    return self.send(*result)
                if isinstance(result, str):
                    result = completion(result, request)
                self.send(200, result)

        return Handler


def count_words(content) -> int:
    """Whitespace words of a message content (a string or a list of parts; image parts count 0)."""
    if isinstance(content, str):
        return len(content.split())
    return sum(len(str(part.get("text", "")).split()) for part in content if isinstance(part, dict))


def completion(text: str, request: dict) -> dict:
    """A chat.completion body for `text`, with rough whitespace token counts as usage."""
    prompt_words = sum(count_words(message.get("content", "")) for message in request.get("messages", []))
    return {
        "id": "chatcmpl-local", "object": "chat.completion", "model": request.get("model", ""),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_words, "completion_tokens": len(text.split()),
                  "total_tokens": prompt_words + len(text.split())},
    }
