"""Engine client: one gRPC session over the engine's UNIX socket.

The client never raises into its caller's hot path for connectivity: while
the engine is unreachable every call fails fast with EngineUnavailable (no
RPC is attempted), and a background thread reconnects with exponential
backoff. After each (re)connection the registered `on_connect` hooks run
(re-register KV memory, re-open the namespace) before the client reports
itself connected again.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from ._proto import engine_pb2 as pb
from ._proto import engine_pb2_grpc as pb_grpc
from .compat import LOGGER_NAME
from .config import UnsafeSocketDir, check_socket_dir
from .metrics import Metrics

log = logging.getLogger(LOGGER_NAME)


class EngineError(Exception):
    """The engine answered with an error status."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str = ""):
        super().__init__(f"{method}: {code.name}: {details}" if method else f"{code.name}: {details}")
        self.code = code
        self.details = details


class EngineUnavailable(EngineError):
    """No session with the engine right now (not connected, or it went away)."""

    def __init__(self, details: str, method: str = ""):
        super().__init__(grpc.StatusCode.UNAVAILABLE, details, method)


class CallCancelled(EngineError):
    """The caller cancelled the RPC through its CallHandle (the session is fine)."""

    def __init__(self, method: str = ""):
        super().__init__(grpc.StatusCode.CANCELLED, "cancelled by the connector", method)


class CallHandle:
    """Lets another thread cancel an RPC in flight (and any later call made
    with the handle: a cancelled handle fails them at once). The engine seals
    nothing of a Save cancelled before its commit. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._future: Any = None
        self.cancelled = False

    def _attach(self, future: Any) -> bool:
        with self._lock:
            self._future = future
            return not self.cancelled

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            fut = self._future
        if fut is not None:
            fut.cancel()


# Codes that mean the session or connection is gone rather than that the
# request was wrong.
_LOST = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    # The client owns reconnection (new channel per attempt); keep gRPC's own
    # backoff short so a channel never sits out a restart for minutes.
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_http_proxy", 0),
]


class EngineClient:
    """A session with the engine, kept alive across engine restarts.

    Thread-safe. `start()` launches the keeper thread; calls made before the
    first connection fail with EngineUnavailable.
    """

    def __init__(self, socket_path: str, client_name: str, metrics: Metrics | None = None,
                 connect_timeout_s: float = 2.0, backoff_min_s: float = 0.05,
                 backoff_max_s: float = 5.0, socket_owner: str | None = None):
        self.socket_path = socket_path
        self.socket_owner = socket_owner
        self.client_name = client_name
        self.metrics = metrics or Metrics()
        self._connect_timeout = connect_timeout_s
        self._backoff_min = backoff_min_s
        self._backoff_max = backoff_max_s
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.EngineStub | None = None
        self._session: str | None = None
        self._generation = 0  # bumps on every new session
        self._backend = ""
        self._version = ""
        self._peer_address = ""
        self._hooks: list[Callable[[EngineClient], None]] = []
        self._lost = threading.Event()
        self._lost.set()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._last_warn = 0.0

    # ------------------------------------------------------------ lifecycle

    def add_on_connect(self, hook: Callable[[EngineClient], None]) -> None:
        """Runs hook after every new session (and now, if connected).

        A hook that raises is logged; the session stays up (a failed
        registration must not stop queries or other ranks).
        """
        with self._lock:
            self._hooks.append(hook)
            connected = self._session is not None
        if connected:
            self._run_hook(hook)

    def remove_on_connect(self, hook: Callable[[EngineClient], None]) -> None:
        """Undoes add_on_connect (no-op if the hook is not there)."""
        with self._lock:
            if hook in self._hooks:
                self._hooks.remove(hook)

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._keeper, name="pegaflow-engine-client",
                                            daemon=True)
            self._thread.start()

    def wait_connected(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._session is None and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return self._session is not None

    @property
    def connected(self) -> bool:
        return self._session is not None

    @property
    def session_id(self) -> str | None:
        return self._session

    @property
    def generation(self) -> int:
        """Changes whenever a new session starts (state from before is gone)."""
        return self._generation

    @property
    def peer_address(self) -> str:
        """The engine's advertised peer address (host:port; "" without
        --peer-addr): other engines fetch this engine's KV from there."""
        return self._peer_address

    @property
    def backend(self) -> str:
        return self._backend

    def close(self) -> None:
        with self._cond:
            self._closed = True
            chan = self._channel
            self._channel, self._stub, self._session = None, None, None
            self._cond.notify_all()
        self._lost.set()
        if chan is not None:
            chan.close()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=2)

    # ------------------------------------------------------------ keeper

    def _keeper(self) -> None:
        backoff = self._backoff_min
        while True:
            self._lost.wait()
            if self._closed:
                return
            ok = self._connect_once()
            if ok:
                backoff = self._backoff_min
                continue
            if self._closed:
                return
            time.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, self._backoff_max)

    def _connect_once(self) -> bool:
        try:
            check_socket_dir(self.socket_path, self.socket_owner)
        except UnsafeSocketDir as e:
            # Checked on every attempt: the operator may fix it meanwhile.
            self.warn_limited("pegaflow: %s: %s", self.client_name, e)
            return False
        chan = grpc.insecure_channel("unix:" + self.socket_path, options=_CHANNEL_OPTIONS)
        stub = pb_grpc.EngineStub(chan)
        try:
            stream = stub.Attach(pb.AttachRequest(client_name=self.client_name),
                                 wait_for_ready=False)
            first: dict[str, Any] = {}
            got = threading.Event()

            def reader() -> None:
                try:
                    for ev in stream:
                        if not got.is_set():
                            first["ev"] = ev
                            got.set()
                    # Stream ended: the engine closed the session.
                except grpc.RpcError as e:
                    first.setdefault("err", e)
                finally:
                    got.set()
                    self._on_stream_end(chan)

            threading.Thread(target=reader, name="pegaflow-attach", daemon=True).start()
            if not got.wait(self._connect_timeout) or "ev" not in first:
                stream.cancel()
                chan.close()
                return False
            ev = first["ev"]
        except Exception as e:  # noqa: BLE001 - any failure is just "not yet"
            log.debug("pegaflow: connect to %s failed: %s", self.socket_path, e)
            chan.close()
            return False
        with self._cond:
            if self._closed:
                stream.cancel()
                chan.close()
                return False
            old = self._channel
            self._channel, self._stub = chan, stub
            self._session = ev.session_id
            self._backend, self._version = ev.backend, ev.engine_version
            self._peer_address = ev.peer_address
            self._generation += 1
            self._stream = stream
            self._lost.clear()
            hooks = list(self._hooks)
            reconnect = self._generation > 1
        if old is not None and old is not chan:
            old.close()
        if reconnect:
            self.metrics.inc("reconnects")
        log.info("pegaflow: %s connected to engine %s (session %s, backend %s, version %s)",
                 self.client_name, self.socket_path, ev.session_id, ev.backend, ev.engine_version)
        for hook in hooks:
            self._run_hook(hook)
        with self._cond:
            self._cond.notify_all()
        return True

    def _run_hook(self, hook: Callable[[EngineClient], None]) -> None:
        try:
            hook(self)
        except Exception as e:  # noqa: BLE001 - reported, never raised
            log.error("pegaflow: post-connect step failed: %s", e)

    def _on_stream_end(self, chan: grpc.Channel) -> None:
        with self._cond:
            if self._channel is not chan or self._closed:
                return
            self._session = None
            self._stub = None
            self._cond.notify_all()
        self.metrics.inc("disconnects")
        log.warning("pegaflow: %s: engine session at %s ended; reconnecting in the background",
                    self.client_name, self.socket_path)
        self._lost.set()

    def _mark_lost(self, stub: pb_grpc.EngineStub) -> None:
        with self._cond:
            if self._stub is not stub:
                return
            chan = self._channel
        # Cancelling the channel ends the Attach stream, whose reader then
        # runs _on_stream_end: one path for every way a session dies.
        if chan is not None:
            chan.close()

    # ------------------------------------------------------------ calls

    def _call(self, method: str, req: Any, timeout_s: float, handle: CallHandle | None = None) -> Any:
        if os.getpid() != self._pid:
            raise EngineUnavailable("client used across fork", method)
        with self._lock:
            stub, session = self._stub, self._session
        if stub is None or session is None:
            raise EngineUnavailable("not connected to the engine", method)
        if hasattr(req, "session_id"):
            req.session_id = session
        try:
            if handle is None:
                return getattr(stub, method)(req, timeout=timeout_s)
            fut = getattr(stub, method).future(req, timeout=timeout_s)
            if not handle._attach(fut):
                fut.cancel()
            return fut.result()
        except grpc.FutureCancelledError:
            raise CallCancelled(method) from None
        except grpc.RpcError as e:
            if handle is not None and handle.cancelled:
                raise CallCancelled(method) from None
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            details = e.details() if hasattr(e, "details") else str(e)
            if code in _LOST or (code == grpc.StatusCode.NOT_FOUND and "session" in (details or "")):
                self._mark_lost(stub)
                raise EngineUnavailable(details or code.name, method) from None
            raise EngineError(code, details or "", method) from None
        except ValueError as e:  # channel closed under us
            raise EngineUnavailable(str(e), method) from None

    def open_namespace(self, ns: pb.Namespace, timeout_s: float) -> str:
        return self._call("OpenNamespace", pb.OpenNamespaceRequest(namespace=ns), timeout_s).namespace_id

    def register(self, req: pb.RegisterRequest, timeout_s: float) -> pb.RegisterResponse:
        return self._call("Register", req, timeout_s)

    def unregister(self, instance_id: str, rank: int, timeout_s: float) -> None:
        self._call("Unregister", pb.UnregisterRequest(instance_id=instance_id, rank=rank), timeout_s)

    def save(self, req: pb.SaveRequest, timeout_s: float, handle: CallHandle | None = None
             ) -> pb.SaveResponse:
        """`handle` lets another thread cancel the save (CallCancelled)."""
        return self._call("Save", req, timeout_s, handle)

    def load(self, req: pb.LoadRequest, timeout_s: float) -> pb.LoadResponse:
        return self._call("Load", req, timeout_s)

    def query(self, req: pb.QueryRequest, timeout_s: float) -> pb.QueryResponse:
        return self._call("Query", req, timeout_s)

    def release(self, lease_id: str = "", transfer_id: str = "", timeout_s: float = 2.0) -> None:
        self._call("Release", pb.ReleaseRequest(lease_id=lease_id, transfer_id=transfer_id), timeout_s)

    def block_events(self, req: pb.BlockEventsRequest, timeout_s: float) -> pb.BlockEventsResponse:
        return self._call("BlockEvents", req, timeout_s)

    def health(self, timeout_s: float = 2.0) -> pb.HealthResponse:
        return self._call("Health", pb.HealthRequest(), timeout_s)

    def stats(self, timeout_s: float = 2.0) -> pb.StatsResponse:
        return self._call("Stats", pb.StatsRequest(), timeout_s)

    def warn_limited(self, msg: str, *args: Any, every_s: float = 10.0) -> None:
        """Logs a warning at most once per `every_s` (a dead engine would
        otherwise log once per step)."""
        now = time.monotonic()
        if now - self._last_warn >= every_s:
            self._last_warn = now
            log.warning(msg, *args)
