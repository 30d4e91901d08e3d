"""HTTP layer of the sandbox: routes requests to the engine over stdlib ``http.server``.

Routes (``<root>`` is ``http://host:port``):

* ``POST <root>/api/v1/async/enrich``, ``GET <root>/api/v1/async/status/{job_id}``,
  ``GET <root>/api/v1/async/results/{job_id}``: the ApiOne contract.
* ``GET <root>/_sandbox/usage``, ``POST <root>/_sandbox/expire/{job_id}``,
  ``POST <root>/_sandbox/reset``: sandbox controls, no auth, never faulted or delayed.

``{job_id}`` is one percent-encoded path segment: the raw path is split on ``/`` first
and the segment decoded after, so ids holding ``/`` (sent as ``%2F``) route correctly.
Every error answer, including those of the HTTP layer itself (a malformed request
line, an unsupported method, a stalled upload), is the JSON error envelope.
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, cast
from urllib.parse import unquote

from apione_source.errors import ConfigurationError
from apione_source.sandbox.delivery import WebhookDispatcher
from apione_source.sandbox.engine import (
    JOB_ID_STYLES,
    Engine,
    Reply,
    SandboxConfig,
    error_reply,
)
from apione_source.settings import API_KEY_HEADER, get_plan

_API = "/api/v1/async/"
_CONTROL = "/_sandbox/"
_PREPARE_IDLE_SECONDS = 0.5  # the results preparer's longest nap
_MAX_BODY = 64 * 1024 * 1024  # far above 1,000 records; refuses absurd uploads
# ``error.code`` of the answers the HTTP layer gives before a request reaches a route.
_HTTP_ERROR_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
    505: "http_version_not_supported",
}
# A client that goes away mid-request is routine, not a sandbox bug: no traceback.
_DISCONNECT_ERRNOS = frozenset({errno.ENOTCONN, errno.ESHUTDOWN, errno.EBADF})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Do not join handler threads on close: idle keep-alive connections would block it.
    block_on_close = False
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], engine: Engine) -> None:
        super().__init__(address, _Handler)
        self.engine = engine
        self.latency = engine.config.latency_seconds
        self.submit_answer_delay = engine.config.submit_answer_delay_seconds
        self.request_timeout = engine.config.request_timeout_seconds
        self.stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Print the traceback of a failed request, unless the client just went away."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)) or (
            isinstance(exc, OSError) and exc.errno in _DISCONNECT_ERRNOS
        ):
            return
        super().handle_error(request, client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, socket.socket):
            with self._conns_lock:
                self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        if isinstance(request, socket.socket):
            with self._conns_lock:
                self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Cut open keep-alive connections, so a stopped sandbox really stops answering."""
        self.stopping.set()  # ends submit answer delays at once
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections alive, which clients' pools rely on for throughput.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, small answers would wait
    # ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True
    server_version = "ApiOneSandbox/1.0"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Stay silent: per-request logs are noise and headers could carry the key."""

    def setup(self) -> None:
        # A socket timeout frees the thread of a client that stalls mid-request (and
        # closes keep-alive connections idle for that long).
        super().setup()
        timeout = cast(_Server, self.server).request_timeout
        if timeout is not None:
            self.connection.settimeout(timeout)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer an HTTP-layer error with the JSON error envelope and close."""
        short = self.responses.get(code, ("error", ""))[0]
        if self.request_version == "HTTP/0.9":
            # A request line too broken to name a version: still answer with a status
            # line and headers, which HTTP/0.9 would omit.
            self.request_version = "HTTP/1.0"
        self.close_connection = True
        self._send(error_reply(code, _HTTP_ERROR_CODES.get(code, "http_error"), message or short))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes | Reply:
        """Read the request body, or return the error answer (the connection closes)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            return error_reply(411, "length_required", "send the body with a Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_BODY:
            self.close_connection = True
            return error_reply(400, "invalid_request", "invalid Content-Length")
        if not length:
            return b""
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            return error_reply(408, "request_timeout", "the request body stopped arriving")
        if len(body) < length:  # the client closed its side mid-body
            self.close_connection = True
            return error_reply(400, "invalid_request", "the body is shorter than Content-Length")
        return body

    def _dispatch(self, method: str) -> None:
        server = cast(_Server, self.server)
        body = self._read_body()
        if isinstance(body, Reply):
            self._send(body)
            return
        # Route on the raw path: split on "/" first, decode each segment after.
        path = self.path.partition("?")[0].partition("#")[0]
        try:
            if path.startswith(_API):
                if server.latency > 0:
                    time.sleep(server.latency)
                reply = self._api(server.engine, method, path[len(_API) :].split("/"), body)
                # The job exists and is billed; only the answer is late. A sandbox stopped
                # meanwhile never sends it, as a crashed ApiOne would not (the wait ends at
                # the stop, which may not have cut this connection yet).
                if (
                    reply.billed
                    and server.submit_answer_delay > 0
                    and server.stopping.wait(server.submit_answer_delay)
                ):
                    self.close_connection = True
                    return
            elif path.startswith(_CONTROL):
                reply = self._control(server.engine, method, path[len(_CONTROL) :].split("/"))
            else:
                reply = error_reply(404, "not_found", "no such route")
        except Exception:
            # A sandbox bug: keep it visible, but still answer in the contract's shape.
            traceback.print_exc()
            reply = error_reply(500, "internal_error", "the sandbox failed; see its stderr")
        self._send(reply)

    def _api(self, engine: Engine, method: str, route: list[str], body: bytes) -> Reply:
        api_key = self.headers.get(API_KEY_HEADER)
        if route == ["enrich"]:
            if method != "POST":
                return _method_not_allowed()
            return engine.submit(api_key, body)
        if len(route) == 2 and route[0] in ("status", "results") and route[1]:
            if method != "GET":
                return _method_not_allowed()
            job_id = unquote(route[1])
            if route[0] == "status":
                return engine.status(api_key, job_id)
            return engine.results(api_key, job_id)
        return error_reply(404, "not_found", "no such endpoint")

    @staticmethod
    def _control(engine: Engine, method: str, route: list[str]) -> Reply:
        ok = Reply(200, b'{"status":"success"}')
        if route == ["usage"] and method == "GET":
            return Reply(200, json.dumps(engine.usage()).encode("utf-8"))
        if route == ["reset"] and method == "POST":
            engine.reset_usage()
            return ok
        if len(route) == 2 and route[0] == "expire" and route[1] and method == "POST":
            job_id = unquote(route[1])
            if engine.expire(job_id):
                return ok
            return error_reply(404, "job_not_found", f"no job {job_id!r}")
        return error_reply(404, "not_found", "no such sandbox control")

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)


def _method_not_allowed() -> Reply:
    return error_reply(405, "method_not_allowed", "method not allowed on this endpoint")


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigurationError(f"{name} must be between 0 and 1, got {value}")


class Sandbox:
    """A local, faithful stand-in for ApiOne's async enrichment API.

    Args:
        plan: Plan whose limits apply: free, starter, growth or scale.
        api_key: The one API key accepted.
        host: Interface to listen on.
        port: TCP port; 0 picks a free one.
        job_seconds_base: Processing seconds of every job (before ``time_scale``).
        job_seconds_per_record: Extra processing seconds per record.
        queue_seconds: Seconds a job stays queued before processing.
        time_scale: Multiplies queue and processing durations.
        estimate_factor: Multiplies the ``estimated_completion_seconds`` of every
            submit answer (then rounded up): 1 is an honest estimate of the job's true
            duration, 1/3 one that is 3x too low, 2 one twice too high. Jobs take as
            long as they take; only what the answer says changes.
        failure_rate: Share of jobs that end ``failed`` (reproducible from ``seed``).
        transient_error_rate: Share of API requests answered 500, 503 or 429.
        retry_after_seconds: ``Retry-After`` of the injected 503 and 429 answers.
        latency_seconds: Delay added before answering each API request.
        retention_seconds: Results retention; None uses the plan's.
        record_error_rate: Share of records whose result is ``error`` (per job).
        short_results_rate: Share of jobs whose results (and webhook) lack their last
            result; ``total_records`` still counts it.
        bad_index_rate: Share of jobs where one result carries a wrong ``index``:
            either a duplicate of the next result's index or ``total_records`` (out of
            range; always so when only one result is left).
        wrong_echo_rate: Share of jobs where one result's ``input`` is not the record
            sent: the next record of the job when it differs, else the record with its
            first string field (by name) prefixed ``wrong-``, else the record plus
            ``"_echo": "wrong"``. The result's ``data`` stays that of the sent record.
        status_404_first_rate: Share of jobs whose first status call (that reaches
            the job: not faulted, authorized) answers 404 ``job_not_found``, like a
            replica that has not seen the job yet; later calls answer normally.
            Results calls are not affected.
        unknown_status_rate: Share of jobs whose first ``unknown_status_calls`` status
            answers (not counting a ``status_404_first_rate`` 404) say
            ``"status": "paused"``, a value outside the contract; every other field
            is true. Later answers are normal.
        unknown_status_calls: How many status answers say ``paused`` for those jobs.
        job_id_style: ``"default"`` (``job_`` + 24 hex digits) or ``"odd"``: ids
            outside ``^job_[A-Za-z0-9]+$`` that need path-segment encoding, e.g.
            ``job-1a2b3c.4d5e:6f70/8192 a3+%b4c5`` ("-", ".", ":", "/", " ", "+",
            "%"). The server decodes the id segment after splitting the path, so
            ``/async/status/job-1a2b3c.4d5e%3A6f70%2F8192%20a3%2B%25b4c5`` works.
        submit_answer_delay_seconds: After a submit created (and billed) its job, wait
            this long before answering (cut short by ``stop()``, which then sends no
            answer). Applies to lost-answer 500s too.
        request_timeout_seconds: Socket timeout of each connection: a client that
            stalls mid-request (or a keep-alive connection idle this long) is answered
            408 ``request_timeout`` when possible and closed. None waits forever.
        webhook_secret: Secret signing webhook deliveries.
        webhook_retry_base_seconds: First webhook retry delay; doubles each retry.
        webhook_repeats: Each delivery is sent this many more times after it was
            accepted, with the same delivery id (deliveries are at least once).
        webhook_jitter_seconds: Each delivery waits a random 0..this before its first
            attempt, so deliveries arrive out of order (drawn from ``seed``).
        seed: Seed of every reproducible choice (faults, failures, record errors, and
            which jobs get each contract drift above).
        clock: Unix time source; inject a fake one to drive jobs without sleeping.

    Every drift rate is drawn per job from ``seed`` and the job's sequence number, so
    the same seed and the same submits give the same drift. All default to today's
    contract-abiding behaviour.

    Raises:
        ConfigurationError: Unknown plan or job id style, a rate outside ``[0, 1]``,
            a negative duration, count or estimate factor, or a non-positive request
            timeout.
    """

    def __init__(
        self,
        plan: str = "growth",
        api_key: str = "sk_test_sandbox",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        job_seconds_base: float = 0.0,
        job_seconds_per_record: float = 0.0,
        queue_seconds: float = 0.0,
        time_scale: float = 1.0,
        estimate_factor: float = 1.0,
        failure_rate: float = 0.0,
        transient_error_rate: float = 0.0,
        retry_after_seconds: int = 1,
        latency_seconds: float = 0.0,
        retention_seconds: float | None = None,
        record_error_rate: float = 0.0,
        short_results_rate: float = 0.0,
        bad_index_rate: float = 0.0,
        wrong_echo_rate: float = 0.0,
        status_404_first_rate: float = 0.0,
        unknown_status_rate: float = 0.0,
        unknown_status_calls: int = 2,
        job_id_style: str = "default",
        submit_answer_delay_seconds: float = 0.0,
        request_timeout_seconds: float | None = 30.0,
        webhook_secret: str = "whsec_sandbox",
        webhook_retry_base_seconds: float = 1.0,
        webhook_repeats: int = 0,
        webhook_jitter_seconds: float = 0.0,
        seed: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for name, rate in (
            ("failure_rate", failure_rate),
            ("transient_error_rate", transient_error_rate),
            ("record_error_rate", record_error_rate),
            ("short_results_rate", short_results_rate),
            ("bad_index_rate", bad_index_rate),
            ("wrong_echo_rate", wrong_echo_rate),
            ("status_404_first_rate", status_404_first_rate),
            ("unknown_status_rate", unknown_status_rate),
        ):
            _check_rate(name, rate)
        durations = (
            job_seconds_base,
            job_seconds_per_record,
            queue_seconds,
            time_scale,
            submit_answer_delay_seconds,
        )
        if min(durations) < 0:
            raise ConfigurationError("durations and time_scale must not be negative")
        if not 0 <= estimate_factor < float("inf"):
            raise ConfigurationError(
                f"estimate_factor must be a finite number >= 0, got {estimate_factor}"
            )
        if unknown_status_calls < 0:
            raise ConfigurationError(
                f"unknown_status_calls must not be negative, got {unknown_status_calls}"
            )
        if job_id_style not in JOB_ID_STYLES:
            raise ConfigurationError(
                f"job_id_style must be one of {', '.join(JOB_ID_STYLES)}, got {job_id_style!r}"
            )
        if request_timeout_seconds is not None and not request_timeout_seconds > 0:
            raise ConfigurationError(
                f"request_timeout_seconds must be positive or None, got {request_timeout_seconds}"
            )
        self.config = SandboxConfig(
            plan=get_plan(plan),
            api_key=api_key,
            job_seconds_base=job_seconds_base,
            job_seconds_per_record=job_seconds_per_record,
            queue_seconds=queue_seconds,
            time_scale=time_scale,
            estimate_factor=estimate_factor,
            failure_rate=failure_rate,
            transient_error_rate=transient_error_rate,
            retry_after_seconds=retry_after_seconds,
            latency_seconds=latency_seconds,
            retention_seconds=retention_seconds,
            record_error_rate=record_error_rate,
            short_results_rate=short_results_rate,
            bad_index_rate=bad_index_rate,
            wrong_echo_rate=wrong_echo_rate,
            status_404_first_rate=status_404_first_rate,
            unknown_status_rate=unknown_status_rate,
            unknown_status_calls=unknown_status_calls,
            job_id_style=job_id_style,
            submit_answer_delay_seconds=submit_answer_delay_seconds,
            request_timeout_seconds=request_timeout_seconds,
            seed=seed,
        )
        self.engine = Engine(self.config, clock)
        self._host = host
        self._port = port
        self._dispatcher = WebhookDispatcher(
            self.engine,
            webhook_secret,
            webhook_retry_base_seconds,
            clock,
            repeats=webhook_repeats,
            jitter_seconds=webhook_jitter_seconds,
            seed=seed,
        )
        self._preparer = _ResultsPreparer(self.engine)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        # Never show the API key.
        where = self.root_url if self._server is not None else "stopped"
        return f"Sandbox(plan={self.config.plan.name!r}, {where})"

    def start(self) -> Sandbox:
        """Bind the port and serve in a daemon thread.

        Returns:
            self, so ``sb = Sandbox(...).start()`` works.
        """
        if self._server is not None:
            return self
        self._server = _Server((self._host, self._port), self.engine)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="apione-sandbox-http",
            daemon=True,
        )
        self._thread.start()
        self._dispatcher.start()
        self._preparer.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open connections and stop webhook deliveries."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._dispatcher.stop()
        self._preparer.stop()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def root_url(self) -> str:
        """``http://host:port`` of the running sandbox."""
        if self._server is None:
            raise RuntimeError("the sandbox is not started")
        host, port = self._server.server_address[:2]
        host_text = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://{host_text}:{port}"

    @property
    def base_url(self) -> str:
        """The API base URL, ``<root_url>/api/v1``, to give to the client."""
        return f"{self.root_url}/api/v1"

    def usage(self) -> dict[str, Any]:
        """Return the usage counters (same JSON as ``GET <root_url>/_sandbox/usage``)."""
        return self.engine.usage()

    def expire(self, job_id: str) -> None:
        """Make a job's results 410 ``results_expired`` at once.

        Raises:
            KeyError: The job is unknown.
        """
        if not self.engine.expire(job_id):
            raise KeyError(job_id)

    def reset_usage(self) -> None:
        """Zero the usage counters."""
        self.engine.reset_usage()


class _ResultsPreparer:
    """Builds each job's results halfway through its work, in a thread of its own.

    ApiOne has a job's results when it completes; built at the first results call
    instead, 1,000 records took the sandbox ~25 ms each, one job after another, while
    the other jobs' status calls waited: the sandbox, not the client, set the pace at the
    end of every round of jobs.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="apione-sandbox-results", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._engine.prepare_signal.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        engine, signal = self._engine, self._engine.prepare_signal
        while not self._stop.is_set():
            due, next_at = engine.take_results_to_prepare()
            for job in due:
                try:
                    engine.prepare_results(job)
                except Exception:
                    # A sandbox bug: show it; the results call builds them instead.
                    traceback.print_exc()
            if not due:
                wait = _PREPARE_IDLE_SECONDS if next_at is None else next_at - engine.now()
                signal.wait(min(max(wait, 0.001), _PREPARE_IDLE_SECONDS))
                signal.clear()
