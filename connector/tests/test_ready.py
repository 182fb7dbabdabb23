"""The connector's own failure reports obey the engine's --kv-ready-allow
rules and never follow a redirect (a client that reaches vLLM directly
writes pegaflow_ready_url)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from pegaflow_connector.config import ConnectorConfig
from pegaflow_connector.ready import FailureReporter, ReadyAllow


@pytest.mark.parametrize("allow,url,allowed", [
    ("", "http://127.0.0.1:9/kv_ready", True),
    ("", "http://localhost:9/kv_ready", True),
    ("", "http://[::1]:9/kv_ready", True),
    ("", "http://10.0.0.7:8080/kv_ready", False),
    ("", "http://169.254.169.254/latest/meta-data", False),
    ("", "http://127.0.0.1@10.0.0.7:8080/kv_ready", False),
    ("", "http://u:p@127.0.0.1:9/kv_ready", False),
    ("", "ftp://127.0.0.1:9/kv_ready", False),
    ("none", "http://127.0.0.1:9/kv_ready", False),
    ("router:8080", "http://router:8080/kv_ready", True),
    ("router:8080", "https://ROUTER:8080/x", True),
    ("router:8080", "http://router:8081/kv_ready", False),
    ("http://router/kv_ready", "http://router:80/kv_ready", True),
    ("http://router/kv_ready", "https://router/kv_ready", False),
    ("http://router/kv_ready", "http://router/kv_ready/x", True),
    ("http://router/kv_ready", "http://router/kv_readyX", False),
    ("http://router/kv_ready", "http://router/other", False),
    ("http://router/kv_ready", "http://router/kv_ready/../v1/completions", False),
    ("http://router/kv_ready", "http://router/kv_ready/%2e%2e/v1/completions", False),
    ("http://router/kv_ready", "http://router/kv_ready%2f..%2fv1", False),
    ("http://router/kv_ready", "http://router/kv_ready/x%5c..%5cv1", False),
    ("http://router/kv_ready", "http://router/kv_ready/x\\..\\v1", False),
    ("http://router/kv_ready", "http://router:8080/kv_ready", False),
    ("10.244.0.0/16:8000", "http://10.244.3.17:8000/kv_ready", True),
    ("10.244.0.0/16:8000", "http://10.244.3.17:8001/kv_ready", False),
    ("10.244.0.0/16:8000", "http://router.ns.svc:8000/kv_ready", False),
    ("[fd00::/8]:8000", "http://[fd12::5]:8000/kv_ready", True),
    ("loopback,10.0.0.7:8080", "http://10.0.0.7:8080/kv_ready", True),
])
def test_allow_rules(allow: str, url: str, allowed: bool) -> None:
    assert ReadyAllow.parse(allow).allows(url) is allowed


@pytest.mark.parametrize("bad", ["nonsense", "ftp://x/y", "none,loopback", "http://u:p@router/kv_ready",
                                 "10.0.0.0/33:80", "10.0.0.0/8", "10.0.0.0/8:0", "router:http",
                                 "http://r/kv_ready/../v1", "http://r/a%2fb"])
def test_bad_entries_fail_the_config(bad: str) -> None:
    with pytest.raises(ValueError, match="kv_ready_allow"):
        ConnectorConfig.load({"kv_ready_allow": bad}, env={})


def test_allow_list_shares_the_engine_variable() -> None:
    cfg = ConnectorConfig.load({}, env={"PEGAFLOW_KV_READY_ALLOW": "router:8080"})
    assert cfg.kv_ready_allow.allows("http://router:8080/kv_ready")
    assert not cfg.kv_ready_allow.allows("http://127.0.0.1:8080/kv_ready")
    assert ConnectorConfig.load({}, env={}).kv_ready_allow == ReadyAllow.parse("loopback")
    assert ConnectorConfig.load({"kv_ready_allow": ["a:1", "b:2"]}, env={}).kv_ready_allow.allows("http://b:2/")


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Records every request; /redirect answers 302 to /target."""

    seen: list[tuple[str, str]]

    def _handle(self) -> None:
        self.seen.append((self.command, self.path))
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "/target")
        else:
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _handle

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    seen: list[tuple[str, str]] = []
    handler = type("H", (_Recorder,), {"seen": seen})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", seen
    finally:
        srv.shutdown()
        srv.server_close()


def test_report_goes_only_where_allowed(recorder: tuple[str, list[tuple[str, str]]]) -> None:
    base, seen = recorder
    r = FailureReporter(ReadyAllow.parse(base + "/kv_ready"))
    assert not r.report(base + "/kv_readyX", "t1", "tok", "save failed")
    assert not r.report(base + "/kv_ready/../v1/completions", "t2", "tok", "save failed")
    assert not r.report(base + "/kv_ready/%2e%2e/v1/completions", "t3", "tok", "save failed")
    assert seen == [], "a disallowed URL is never contacted"
    assert r.report(base + "/kv_ready", "t4", "tok", "save failed")
    assert seen == [("POST", "/kv_ready")]


def test_report_never_follows_a_redirect(recorder: tuple[str, list[tuple[str, str]]]) -> None:
    base, seen = recorder
    r = FailureReporter(ReadyAllow.parse("loopback"))
    assert not r.report(base + "/redirect", "t1", "tok", "save failed"), "a 3xx is no acceptance"
    assert seen == [("POST", "/redirect")], "the redirect's target is never contacted"
