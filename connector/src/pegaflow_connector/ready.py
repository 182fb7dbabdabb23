"""Reports a transfer as failed to the router's /kv_ready when the engine cannot.

Normally the engine tells the router that a P/D transfer is ready or failed.
When the engine itself is gone (crashed, restarting, unreachable), nobody
would, and the router would wait its whole --kv-ready-timeout before
decoding anyway. The P worker knows its save was dropped, so it reports the
failure itself and D starts recomputing at once.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from .compat import LOGGER_NAME

log = logging.getLogger(LOGGER_NAME)

# The URL a report goes to comes from the request's kv_transfer_params,
# which whoever reaches vLLM directly can write. So, like the engine's own
# report (engine/callback.go), the connector POSTs only where the operator
# allowed (ReadyAllow: the engine's --kv-ready-allow syntax and meaning),
# and never follows a redirect or a proxy.

LOOPBACK = "loopback"
NONE = "none"

_BAD_ESCAPE = re.compile(r"%(?![0-9a-fA-F]{2})")


@dataclass(frozen=True)
class _Rule:
    loopback: bool = False
    scheme: str = ""
    host: str = ""  # lower-case host:port, port explicit
    path: str = ""  # decoded; "" admits every path
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: str = ""  # of a CIDR rule


def _valid_port(p: str) -> bool:
    return p.isdigit() and str(int(p)) == p and 1 <= int(p) <= 65535


def _join(host: str, port: str) -> str:
    host = host.lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_host_port(s: str) -> tuple[str, str]:
    """host:port or [v6]:port; ValueError otherwise."""
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or s[end + 1:end + 2] != ":":
            raise ValueError("want host:port")
        return s[1:end], s[end + 2:]
    host, sep, port = s.rpartition(":")
    if not sep or ":" in host:
        raise ValueError("want host:port")
    return host, port


def _canonical_host(u: SplitResult) -> str:
    port = u.port  # ValueError for a bad port
    if port is None:
        port = 443 if u.scheme == "https" else 80
    return _join(u.hostname or "", str(port))


def _clean_path(path: str) -> str | None:
    """The decoded path, or None when a server could read it otherwise than
    written: a dot segment (also %2e-encoded), an encoded slash or backslash
    (%2f, %5c), a backslash, a malformed escape."""
    if _BAD_ESCAPE.search(path):
        return None
    for seg in path.split("/"):
        low = seg.lower()
        if "%2f" in low or "%5c" in low or "\\" in seg or unquote(seg) in (".", ".."):
            return None
    return unquote(path)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ReadyAllow:
    """Where a failure report may go: the engine's `--kv-ready-allow` rules.

    Entries (comma-separated): `host:port` (any scheme and path on it), an
    http(s) URL prefix (same scheme, host and port, a path equal to the
    prefix's or below it on a segment boundary), `CIDR:port` (IP literals in
    the prefix on that port), `loopback` (localhost, 127.0.0.0/8, ::1, any
    port) or `none` (alone). Empty: loopback, as the engine's default
    without a router. Whatever the rule, URLs with userinfo, dot segments or
    encoded slashes are refused.
    """

    def __init__(self, rules: tuple[_Rule, ...], text: str) -> None:
        self._rules = rules
        self.text = text

    def __repr__(self) -> str:
        return f"ReadyAllow({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReadyAllow) and other._rules == self._rules

    def __hash__(self) -> int:
        return hash(self._rules)

    @classmethod
    def parse(cls, value: object) -> ReadyAllow:
        """Parses the list; ValueError naming the bad entry."""
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value or "")
        entries = [e.strip() for e in text.split(",")] if text.strip() else []
        if not entries:
            return cls((_Rule(loopback=True),), LOOPBACK)
        rules: list[_Rule] = []
        for entry in entries:
            low = entry.lower()
            if low == NONE:
                if len(entries) > 1:
                    raise ValueError(f"{entry!r} cannot be combined with other entries")
                return cls((), NONE)
            if low == LOOPBACK:
                rules.append(_Rule(loopback=True))
            elif "://" in entry:
                rules.append(cls._url_rule(entry))
            elif "/" in entry:
                cidr, _, port = entry.rpartition(":")
                try:
                    net = ipaddress.ip_network(cidr.strip("[]"), strict=False)
                except ValueError:
                    net = None
                if not cidr or net is None or not _valid_port(port):
                    raise ValueError(f"{entry!r}: a CIDR entry is CIDR:port, e.g. 10.244.0.0/16:8000")
                rules.append(_Rule(network=net, port=port))
            else:
                try:
                    host, port = _split_host_port(entry)
                except ValueError:
                    host, port = "", ""
                if not host or not _valid_port(port):
                    raise ValueError(f"{entry!r}: want host:port, an http(s) URL prefix, CIDR:port, "
                                     f"{LOOPBACK!r} or {NONE!r}")
                rules.append(_Rule(host=_join(host, port)))
        return cls(tuple(rules), ",".join(entries))

    @staticmethod
    def _url_rule(entry: str) -> _Rule:
        try:
            u = urlsplit(entry)
            host = _canonical_host(u)
        except ValueError as e:
            raise ValueError(f"{entry!r}: {e}") from e
        path = _clean_path(u.path)
        if u.scheme not in ("http", "https") or not u.hostname or u.username is not None \
                or u.password is not None or u.query or u.fragment:
            raise ValueError(f"{entry!r}: want an http(s) URL prefix like http://router:8080/kv_ready")
        if path is None:
            raise ValueError(f"{entry!r}: a URL prefix takes no dot segments or encoded slashes")
        return _Rule(scheme=u.scheme, host=host, path=path)

    def allows(self, url: str) -> bool:
        """Whether a report may be POSTed to url."""
        try:
            u = urlsplit(url)
            host = _canonical_host(u)
        except ValueError:
            return False
        if u.scheme not in ("http", "https") or not u.hostname or "@" in u.netloc:
            return False
        path = _clean_path(u.path)
        if path is None:
            return False
        hostname, port = u.hostname, host.rpartition(":")[2]
        for r in self._rules:
            if r.loopback:
                if _is_loopback(hostname):
                    return True
            elif r.network is not None:
                try:
                    if port == r.port and ipaddress.ip_address(hostname) in r.network:
                        return True
                except ValueError:
                    pass
            elif (not r.scheme or r.scheme == u.scheme) and r.host == host and _path_under(path, r.path):
                return True
        return False


def _path_under(path: str, prefix: str) -> bool:
    if prefix in ("", "/"):
        return True
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx is the answer: the allow list vetted the URL, not where it points on."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


# No proxy from the environment either: the router is on the cluster network.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

# Transfers already reported by this worker (a transfer's blocks may be
# saved over several steps; one report is enough). Bounded: old ids go.
_REMEMBERED = 4096


class FailureReporter:
    """Posts {"transfer_id", "token", "status": "failed", "message"} once per transfer."""

    def __init__(self, allow: ReadyAllow | None = None, timeout_s: float = 2.0) -> None:
        self._allow = allow if allow is not None else ReadyAllow.parse("")
        self._timeout_s = timeout_s
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def report(self, url: str, transfer_id: str, token: str, message: str) -> bool:
        """Sends the report; returns whether the router accepted it.

        Called on the worker's save thread, never on vLLM's loop, and bounded
        by the timeout. Without a URL or token (sync handoff, old router)
        there is nobody to tell.
        """
        if not url or not token or not transfer_id:
            return False
        if not self._allow.allows(url):
            log.warning("pegaflow: not reporting failed transfer %s to %s: not allowed by kv_ready_allow (%s)",
                        transfer_id, url, self._allow.text)
            return False
        with self._lock:
            if transfer_id in self._seen:
                return False
            self._seen[transfer_id] = None
            while len(self._seen) > _REMEMBERED:
                self._seen.popitem(last=False)
        body = json.dumps({"transfer_id": transfer_id, "token": token, "status": "failed",
                           "message": message}).encode()
        req = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(req, timeout=self._timeout_s) as resp:
                return bool(200 <= resp.status < 300)
        except (urllib.error.URLError, OSError, ValueError) as e:
            log.warning("pegaflow: could not report failed transfer %s to %s: %s", transfer_id, url, e)
            return False
