"""``apione-dlt webhooks serve``: the receiver of ApiOne's signed ``jobFinished`` deliveries.

A Starlette app (served by uvicorn). ``POST /webhooks/apione`` checks the signature
(HMAC-SHA256 over the timestamp and the raw body, the timestamp within ``tolerance``,
constant-time comparison, strict parsing: :mod:`apione_source.webhooks`), parses the
body strictly, and stores the delivery durably (:class:`~apione_source.deliveries.DeliveryStore`)
before it answers 2xx, so ApiOne retries anything not stored. A delivery id stored before
is acknowledged and not stored again (ApiOne repeats deliveries; a replay gains nothing).
``GET /health`` answers 200 when a probe file can be written to the store and read back.

Answers: 200 stored (or already stored); 400 a body or header outside the contract;
401 a missing, bad or stale signature; 413 a body too large; 503 the store failed
(ApiOne retries). Bodies, signatures and the secret are never logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from apione_source.deliveries import DELIVERY_ID, Delivery, DeliveryStore
from apione_source.errors import WebhookSignatureError
from apione_source.models import WebhookEvent
from apione_source.secret import Secret
from apione_source.webhooks import (
    DEFAULT_TOLERANCE_SECONDS,
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    verify_signature,
)

logger = logging.getLogger("apione_source.receiver")

PATH = "/webhooks/apione"
MAX_BODY_BYTES = 64 * 1024 * 1024  # a job of 1,000 rich records is a few MB


def _refuse(status: int, error: str, message: str) -> JSONResponse:
    return JSONResponse({"status": "error", "error": error, "message": message}, status)


def create_app(
    store: DeliveryStore,
    secret: Secret,
    *,
    tolerance: int = DEFAULT_TOLERANCE_SECONDS,
    clock: Callable[[], float] = time.time,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Starlette:
    """The receiver app.

    Args:
        store: Where deliveries are kept for the next run.
        secret: The account's webhook secret.
        tolerance: Seconds a signature's timestamp may be away from ``clock``.
        clock: Unix time.
        max_body_bytes: Larger bodies are refused (413) as soon as they get that large.
    """

    async def receive(request: Request) -> JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
            return _refuse(413, "too_large", f"bodies above {max_body_bytes} bytes are refused")
        chunks, size = [], 0
        async for chunk in request.stream():  # capped as it comes (chunked bodies too)
            size += len(chunk)
            if size > max_body_bytes:
                return _refuse(413, "too_large", f"bodies above {max_body_bytes} bytes are refused")
            chunks.append(chunk)
        body = b"".join(chunks)
        signature = request.headers.get(SIGNATURE_HEADER, "")
        try:
            verify_signature(secret.reveal(), body, signature, now=clock(), tolerance=tolerance)
        except WebhookSignatureError as exc:
            logger.warning("webhook refused: %s", exc)
            return _refuse(401, "bad_signature", str(exc))
        delivery_id = request.headers.get(DELIVERY_HEADER, "")
        if not DELIVERY_ID.fullmatch(delivery_id):
            return _refuse(400, "bad_delivery_id", f"{DELIVERY_HEADER} is missing or malformed")
        try:  # megabytes of JSON: off the event loop
            event = await run_in_threadpool(WebhookEvent.model_validate_json, body)
        except ValidationError as exc:
            return _refuse(400, "bad_body", f"not a jobFinished body ({exc.error_count()} errors)")
        if request.headers.get(EVENT_HEADER, event.event) != event.event:
            return _refuse(400, "event_mismatch", f"{EVENT_HEADER} does not match the body")
        delivery = Delivery(delivery_id, event.job_id, event.event, signature, body, clock())
        try:
            stored = await run_in_threadpool(store.put, delivery)
        except ValueError as exc:
            return _refuse(400, "bad_job_id", str(exc))
        except OSError as exc:
            logger.error("webhook %s not stored (ApiOne retries): %s", delivery_id, exc)
            return _refuse(503, "store_unavailable", "the delivery could not be stored")
        logger.info(
            "webhook %s for %s (%s): %s",
            delivery_id,
            event.job_id,
            event.event,
            "stored" if stored else "already stored",
        )
        return JSONResponse({"status": "ok", "stored": stored})

    async def health(request: Request) -> JSONResponse:
        try:
            await run_in_threadpool(store.writable)
        except Exception as exc:  # whatever the store raises: not healthy
            logger.error("health: the store cannot be written: %s", exc)
            return _refuse(503, "store_unavailable", "the store cannot be written")
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[Route(PATH, receive, methods=["POST"]), Route("/health", health, methods=["GET"])]
    )
