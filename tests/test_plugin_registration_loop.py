"""The registration loop (``linchkit_plugin.registry.Registration``) waits as its backoff
says, against a fake etcd gateway: ``refused_retry_wait``'s own test holds the waits'
values (tests/test_plugin_registry_secure.py); this one holds the loop to them, the
refusal counted, doubled, capped, started again after a success and kept across an
outage. The gateway is a fake on a loopback port because a real etcd cannot be told to
refuse, admit and fall silent at the tries a test names (the secure tests do that with a
real one, over minutes); the waits are the loop's, seen through its ``pause`` seam and
never taken.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import orjson
import pytest

from linchkit_plugin.registry import Registration

#: What etcd does at each try: ``R`` refuses (HTTP 403, permission denied), ``U`` answers
#: nothing etcd would (an etcd that does not answer, for the loop), ``A`` admits.
TRIES = "RRRRRRARURUURAU"
PACE = 1.0  # the outage pace at a TTL of 10 s
PERIOD = 10 / 3  # the renewal period
#: The span each try's wait must lie in: a refusal's from ``PACE`` times 2^(n-1) to
#: 2^n after the n-th in a row, up to 15-30 s; a success's the renewal period, which
#: starts the count again; an outage's the pace, which keeps it.
EXPECTED = [
    (1.0, 2.0),  # R
    (2.0, 4.0),  # R
    (4.0, 8.0),  # R
    (8.0, 16.0),  # R
    (15.0, 30.0),  # R: the cap
    (15.0, 30.0),  # R
    (PERIOD, PERIOD),  # A
    (1.0, 2.0),  # R: from the first again
    (PACE, PACE),  # U
    (2.0, 4.0),  # R: the second in a row still
    (PACE, PACE),  # U
    (PACE, PACE),  # U
    (4.0, 8.0),  # R
    (PERIOD, PERIOD),  # A
    (PACE, PACE),  # U
]


class _ScriptedEtcd(http.server.ThreadingHTTPServer):
    """etcd's JSON gateway as far as registering goes, answering each try as ``TRIES``
    says; ``tried`` is the try under way (set by the test's pause)."""

    daemon_threads = True
    tried = 0


class _Gateway(http.server.BaseHTTPRequestHandler):
    server: _ScriptedEtcd
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        tried = self.server.tried
        outcome = TRIES[tried] if tried < len(TRIES) else "A"  # leaving, every try made
        status, answer = 200, b'{"header":{}}'
        if outcome == "R":
            status = 403
            denied = "etcdserver: permission denied"
            answer = orjson.dumps({"error": denied, "code": 7, "message": denied})
        elif outcome == "U":
            answer = b"{}"  # no lease granted, none renewed: not etcd's answer
        elif self.path == "/v3/lease/grant":
            answer = b'{"header":{},"ID":"7587","TTL":"10"}'
        elif self.path == "/v3/lease/keepalive":
            answer = b'{"result":{"ID":"7587","TTL":"10"}}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def etcd() -> Iterator[_ScriptedEtcd]:
    server = _ScriptedEtcd(("127.0.0.1", 0), _Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_the_loop_waits_as_the_backoff_says(etcd: _ScriptedEtcd) -> None:
    waits: list[float] = []
    every_try_made = threading.Event()

    def pause(seconds: float) -> bool:
        waits.append(seconds)
        etcd.tried += 1
        if etcd.tried < len(TRIES):
            return False
        every_try_made.set()
        return True  # stop: the loop leaves

    said: list[str] = []
    registration = Registration(
        f"http://127.0.0.1:{etcd.server_address[1]}",
        "/linchkit/plugins/echo",
        {"address": "127.0.0.1:50051"},
        ttl=10,
        say=said.append,
        pause=pause,
    )
    registration.start()
    assert every_try_made.wait(timeout=60), f"the loop stopped short: {waits}"
    registration.stop()
    assert len(waits) == len(EXPECTED), waits
    for tried, (wait, (low, high)) in enumerate(zip(waits, EXPECTED, strict=True), start=1):
        assert low <= wait <= high, (
            f"try {tried} ({TRIES[tried - 1]}): {wait} s; every wait: {waits}"
        )
    assert said[-1].startswith("deregistered "), said
