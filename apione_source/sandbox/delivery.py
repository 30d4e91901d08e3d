"""Background delivery of the sandbox's ``jobFinished`` webhooks.

A dispatcher thread watches the engine for jobs that finished (their state is computed
from the clock, so nothing else would notice) and hands each to its own delivery
thread, which POSTs the signed body and retries non-2xx answers and connection errors
with exponential backoff, keeping one delivery id across the retries. A URL that cannot
be delivered to at all (the submit refuses those, so only a sandbox bug gets here) ends
that delivery at once; no thread dies from bad input.
"""

from __future__ import annotations

import http.client
import random
import secrets
import threading
import traceback
from collections.abc import Callable
from urllib.parse import urlsplit

from apione_source.sandbox.engine import Engine, WebhookDue
from apione_source.webhooks import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, sign

MAX_ATTEMPTS = 8
_POLL_SECONDS = 0.01  # while jobs with webhooks are running: how often to look
_IDLE_SECONDS = 0.5  # with none pending; a new one wakes the dispatcher at once


def post_once(due: WebhookDue, headers: dict[str, str], timeout: float) -> int:
    """POST one delivery attempt.

    Args:
        due: The delivery.
        headers: Request headers (signature included).
        timeout: Connect and read timeout in seconds.

    Returns:
        The receiver's HTTP status.

    Raises:
        OSError: The connection failed or timed out.
        http.client.HTTPException: The receiver's answer was not HTTP.
        ValueError: The URL cannot be delivered to (no host, a bad port, ...).
    """
    parts = urlsplit(due.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the webhook URL has no http(s) scheme or no host")
    conn_cls = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    # hostname and port, not netloc: user info in the URL is not part of the address.
    conn = conn_cls(parts.hostname, parts.port, timeout=timeout)
    try:
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn.request("POST", path, body=due.body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class WebhookDispatcher:
    """Delivers the engine's due webhooks until stopped.

    Args:
        engine: The engine whose finished jobs are delivered.
        secret: The webhook signing secret.
        retry_base_seconds: Delay before the first retry; doubles on each further one.
        clock: Unix time used for the signature timestamp (the sandbox's clock, so a
            fake clock in tests signs with fake time).
        timeout: Per-attempt connect/read timeout in seconds.
        repeats: Deliveries sent again after they were accepted (same delivery id).
        jitter_seconds: Random wait (0..this) before a delivery's first attempt.
        seed: Seed of the jitter.
    """

    def __init__(
        self,
        engine: Engine,
        secret: str,
        retry_base_seconds: float,
        clock: Callable[[], float],
        timeout: float = 5.0,
        *,
        repeats: int = 0,
        jitter_seconds: float = 0.0,
        seed: int = 0,
    ) -> None:
        self._engine = engine
        self._secret = secret
        self._retry_base = retry_base_seconds
        self._clock = clock
        self._timeout = timeout
        self._repeats = repeats
        self._jitter = jitter_seconds
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the dispatcher thread."""
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="apione-sandbox-webhooks", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop dispatching; pending retries are abandoned."""
        self._stop.set()
        self._engine.webhook_signal.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        signal = self._engine.webhook_signal
        while not self._stop.is_set():
            try:
                due_now = self._engine.take_due_webhooks()
            except Exception:
                # A sandbox bug: show it, keep delivering the other jobs' webhooks.
                traceback.print_exc()
                due_now = []
            for due in due_now:
                threading.Thread(
                    target=self._deliver, args=(due,), name="apione-sandbox-delivery", daemon=True
                ).start()
            if self._engine.has_pending_webhooks():
                self._stop.wait(_POLL_SECONDS)
            else:
                signal.wait(_IDLE_SECONDS)
                signal.clear()

    def _deliver(self, due: WebhookDue) -> None:
        try:
            self._attempts(due)
        except Exception:
            traceback.print_exc()  # a sandbox bug; this delivery is abandoned

    def _attempts(self, due: WebhookDue) -> None:
        delivery_id = "dlv_" + secrets.token_hex(12)
        with self._rng_lock:
            jitter = self._rng.uniform(0.0, self._jitter)
        if jitter and self._stop.wait(jitter):
            return
        for _ in range(1 + self._repeats):  # at least once: accepted ones may come again
            if not self._deliver_once(due, delivery_id):
                return

    def _deliver_once(self, due: WebhookDue, delivery_id: str) -> bool:
        """Attempts until accepted (True), or given up (False)."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            # Re-signed on every attempt so a late retry still passes the receiver's
            # timestamp tolerance; the body and delivery id stay the same.
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "ApiOne-Webhooks/1.0 (sandbox)",
                EVENT_HEADER: due.event,
                DELIVERY_HEADER: delivery_id,
                SIGNATURE_HEADER: sign(self._secret, due.body, int(self._clock())),
            }
            try:
                if 200 <= post_once(due, headers, self._timeout) < 300:
                    return True
            except (ValueError, OverflowError, http.client.InvalidURL):
                return False  # a URL no retry can fix (a bad host or port): give up at once
            except (OSError, http.client.HTTPException):
                pass  # connection errors are retried like non-2xx answers
            if attempt < MAX_ATTEMPTS and self._stop.wait(self._retry_base * 2 ** (attempt - 1)):
                return False
        return False
