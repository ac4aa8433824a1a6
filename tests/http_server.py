"""A local HTTP server for remote-shard tests: a folder served on 127.0.0.1 by a thread of the test
process, with faults on purpose, that stops by itself (when the `with` block ends, or after
`lifetime` seconds if a test hangs).

    with serve(folder, faults={"train-000001.tar": ["drop:30000", "ok"], "manifest.json": ["503"]}) as srv:
        srv.url + "/manifest.json"     # http://127.0.0.1:PORT/manifest.json
        srv.requests                   # [(path, action), ...] in arrival order

Faults per file name, used one per request, then "ok": "ok"; "503" / "500" / "404" (an answer with that
status); "drop:N" (the full Content-Length announced, N bytes sent, the connection closed);
"stall:S" (half the file sent, then S seconds of silence, then the connection closed);
"always-drop:N" (every request dropped after N bytes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Served:
    url: str
    root: Path
    faults: dict[str, list[str]]
    requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_action(self, name: str) -> str:
        with self.lock:
            queue = self.faults.get(name, [])
            if queue and queue[0].startswith("always-"):
                action = queue[0][len("always-") :]
            else:
                action = queue.pop(0) if queue else "ok"
            self.requests.append((name, action))
            return action

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.requests if n == name)


def _handler(served: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: the test reads `served.requests`
            pass

        def do_GET(self) -> None:  # noqa: N802 - the http.server protocol
            name = self.path.lstrip("/").split("?")[0]
            path = served.root / name
            action = served.next_action(name)
            if action.isdigit():
                self._status(int(action))
            elif not path.is_file():
                self._status(404)
            else:
                self._send(path.read_bytes(), action)

        def _status(self, code: int) -> None:
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _send(self, data: bytes, action: str) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if action.startswith("drop:"):
                self.wfile.write(data[: int(action.split(":")[1])])
            elif action.startswith("stall:"):
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                time.sleep(float(action.split(":")[1]))
            else:
                self.wfile.write(data)
                return
            self.wfile.flush()
            self.close_connection = True

    return Handler


@contextmanager
def serve(root: str | Path, faults: dict[str, list[str]] | None = None, lifetime: float = 900) -> Iterator[Served]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), None)
    served = Served(f"http://127.0.0.1:{server.server_address[1]}", Path(root), dict(faults or {}))
    server.RequestHandlerClass = _handler(served)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    deadline = threading.Timer(lifetime, server.shutdown)  # a hung test still ends the server
    deadline.daemon = True
    deadline.start()
    try:
        yield served
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
