"""Where webhook deliveries wait for the next run: a folder, local or in a bucket.

The receiver (:mod:`apione_source.receiver`) stores each verified delivery as one file,
``<root>/<job_id>/<delivery_id>.json``, written under a temporary name and renamed into
place, so a file either is whole or is not there. A delivery id already stored is not
written again: ApiOne repeats deliveries, and any copy is as good as another. The run
looks up a job's deliveries by its id and checks each one again (signature, JSON, job
id) before it trusts it; anything else falls back to polling.

``root`` is a path or an fsspec URL (``s3://bucket/apione``, ``gs://...``): the receiver
and the runs must see the same folder, and nothing in it needs to outlive a run's
collection of the job.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from pydantic import ValidationError

from apione_source.errors import WebhookSignatureError
from apione_source.models import WebhookEvent
from apione_source.secret import Secret
from apione_source.settings import JOB_ID_PATTERN
from apione_source.webhooks import verify_signature

# Delivery ids and job ids become file names: nothing but these characters.
DELIVERY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_JOB_ID = re.compile(JOB_ID_PATTERN)


@dataclass(frozen=True)
class Delivery:
    """A delivery as received: what the run needs to check it again and use it."""

    delivery_id: str
    job_id: str
    event: str
    signature: str  # the X-ApiOne-Signature header, checked again by the run
    body: bytes  # the raw body, exactly as signed
    received_at: float

    def to_json(self) -> bytes:
        """The stored form."""
        record = {
            "delivery_id": self.delivery_id,
            "job_id": self.job_id,
            "event": self.event,
            "signature": self.signature,
            "body": self.body.decode("utf-8"),
            "received_at": self.received_at,
        }
        return json.dumps(record).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> Delivery:
        """Read a stored delivery.

        Raises:
            ValueError: Not a stored delivery.
        """
        data = json.loads(raw)
        return cls(
            delivery_id=str(data["delivery_id"]),
            job_id=str(data["job_id"]),
            event=str(data["event"]),
            signature=str(data["signature"]),
            body=str(data["body"]).encode("utf-8"),
            received_at=float(data["received_at"]),
        )


class DeliveryStore:
    """Deliveries under ``root`` (a path or fsspec URL), one file each."""

    def __init__(self, root: str, **storage_options: Any) -> None:
        """Open the folder (created on first write)."""
        self.fs, self.root = url_to_fs(root, skip_instance_cache=True, **storage_options)
        self.root = self.root.rstrip("/")

    def _path(self, job_id: str, delivery_id: str = "") -> str:
        if not _JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id[:80]!r}")
        if delivery_id and not DELIVERY_ID.fullmatch(delivery_id):
            raise ValueError(f"not a delivery id: {delivery_id[:80]!r}")
        folder = f"{self.root}/{job_id}"
        return f"{folder}/{delivery_id}.json" if delivery_id else folder

    def put(self, delivery: Delivery) -> bool:
        """Store ``delivery`` durably; False when its id was stored before (a duplicate).

        Raises:
            ValueError: The job id or delivery id cannot be a file name.
            OSError: The folder cannot be written (answer non-2xx: ApiOne retries).
        """
        path = self._path(delivery.job_id, delivery.delivery_id)
        if self.fs.exists(path):
            return False
        data = delivery.to_json()
        if not isinstance(self.fs, LocalFileSystem):
            self.fs.pipe_file(path, data)  # one PUT: an object is whole or absent
            return True
        folder = self._path(delivery.job_id)
        os.makedirs(folder, exist_ok=True)
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(temporary, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())  # durable before the 200 that stops ApiOne's retries
        os.replace(temporary, path)  # readers see a whole file or none
        return True

    def find(self, job_id: str) -> list[Delivery]:
        """Every stored delivery of ``job_id`` (unreadable files are skipped)."""
        folder = self._path(job_id)
        self.fs.invalidate_cache(folder)  # object stores cache listings: see new files
        try:
            names = [p for p in self.fs.ls(folder, detail=False) if str(p).endswith(".json")]
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            try:
                found.append(Delivery.from_json(self.fs.cat_file(name)))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # never trusted; polling collects the job
        return found

    def writable(self) -> None:
        """Write, read back and delete a probe file (the receiver's health check).

        Raises:
            OSError: The folder cannot be written or read.
        """
        probe = f"{self.root}/.health-{uuid.uuid4().hex}"
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.pipe_file(probe, b"ok")
        try:
            if self.fs.cat_file(probe) != b"ok":
                raise OSError("the store did not give back what was written")
        finally:
            self.fs.rm(probe)


class DeliveryInbox:
    """What a run asks of the deliveries: the trusted event of a job, if one came."""

    def __init__(self, store: DeliveryStore, secret: Secret) -> None:
        """Look in ``store``; trust only deliveries signed with ``secret``."""
        self.store = store
        self._secret = secret

    def event(self, job_id: str) -> WebhookEvent | None:
        """A delivered, trusted event of ``job_id`` (None: none came yet, or none to trust).

        ``job.completed`` wins over ``job.failed`` (deliveries come in any order, and
        spending a job that completed would pay for its records twice). A job id no
        delivery could carry has none.
        """
        if not _JOB_ID.fullmatch(job_id):
            return None
        secret = self._secret.reveal()
        events = [trusted_event(d, secret, job_id) for d in self.store.find(job_id)]
        trusted = [e for e in events if e is not None]
        completed = [e for e in trusted if e.event == "job.completed"]
        if completed:
            return completed[0]
        return trusted[0] if trusted else None


def trusted_event(delivery: Delivery, secret: str, job_id: str) -> WebhookEvent | None:
    """The delivery's event when it is signed by ``secret`` and about ``job_id``, else None.

    The receiver checked the signature and its age on arrival; this checks the stored
    copy again (the store may be writable by others), without the age limit.
    """
    try:
        verify_signature(secret, delivery.body, delivery.signature, tolerance=None)
        event = WebhookEvent.model_validate_json(delivery.body)
    except (WebhookSignatureError, ValidationError, ValueError):
        return None
    return event if event.job_id == job_id else None
