"""The "API limit" baseline: a minimal concurrent client, no dlt, no bookkeeping.

``concurrent_jobs`` workers each take the next ``records_per_job`` records, submit them,
sleep the server's ``estimated_completion_seconds``, poll the status every
:data:`POLL_S` until the job is completed, fetch and decode the results, and go again.
That is as fast as the sandbox lets N records through within the plan's limits; the
connector cannot be faster, so its ratio to this shows what the connector costs on top
of the API (and proves the sandbox, a separate process, is not the bottleneck).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx

POLL_S = 0.02
_TERMINAL = ("completed", "failed")


class ApiLimitError(RuntimeError):
    """The sandbox answered something the minimal client does not handle."""


async def _submit(http: httpx.AsyncClient, records: list[dict[str, Any]]) -> tuple[str, float]:
    """Submit one job; on 429 wait ``Retry-After`` and try again."""
    while True:
        reply = await http.post("/async/enrich", json={"type": "company", "records": records})
        if reply.status_code == 429:
            await asyncio.sleep(float(reply.headers.get("Retry-After", "1")))
            continue
        if reply.status_code != 200:
            raise ApiLimitError(f"submit answered {reply.status_code}: {reply.text[:200]}")
        body = reply.json()
        return str(body["job_id"]), float(body.get("estimated_completion_seconds") or 0)


async def _wait(http: httpx.AsyncClient, job_id: str, estimate_s: float) -> None:
    """Sleep the estimate, then poll until the job is finished."""
    await asyncio.sleep(estimate_s)
    while True:
        reply = await http.get(f"/async/status/{job_id}")
        if reply.status_code != 200:
            raise ApiLimitError(f"status of {job_id} answered {reply.status_code}")
        status = reply.json()["status"]
        if status in _TERMINAL:
            if status != "completed":
                raise ApiLimitError(f"job {job_id} ended {status}")
            return
        await asyncio.sleep(POLL_S)


async def _results(http: httpx.AsyncClient, job_id: str) -> int:
    """Fetch and decode one job's results; return how many there are."""
    reply = await http.get(f"/async/results/{job_id}")
    if reply.status_code != 200:
        raise ApiLimitError(f"results of {job_id} answered {reply.status_code}")
    return len(reply.json()["results"])


async def _worker(http: httpx.AsyncClient, jobs: Iterator[list[dict[str, Any]]]) -> int:
    done = 0
    for records in jobs:  # one iterator shared by every worker: each job is taken once
        job_id, estimate_s = await _submit(http, records)
        await _wait(http, job_id, estimate_s)
        done += await _results(http, job_id)
    return done


async def _run(
    base_url: str, api_key: str, records: list[dict[str, Any]], per_job: int, concurrent: int
) -> int:
    chunks = (records[i : i + per_job] for i in range(0, len(records), per_job))
    limits = httpx.Limits(max_connections=concurrent, max_keepalive_connections=concurrent)
    async with httpx.AsyncClient(
        base_url=base_url, headers={"X-API-Key": api_key}, limits=limits, timeout=120.0
    ) as http:
        counts = await asyncio.gather(*(_worker(http, chunks) for _ in range(concurrent)))
    return sum(counts)


def run(
    base_url: str, api_key: str, records: list[dict[str, Any]], per_job: int, concurrent: int
) -> tuple[float, int]:
    """Send ``records`` through the API as fast as it allows.

    Args:
        base_url: The API base URL (``.../api/v1``).
        api_key: The sandbox's key.
        records: What to submit (``{"domain": ...}`` each).
        per_job: Records per job (the plan's).
        concurrent: Jobs at once (the plan's).

    Returns:
        Seconds from the first submit to the last results, and how many results came.
    """
    t0 = time.perf_counter()
    results = asyncio.run(_run(base_url, api_key, records, per_job, concurrent))
    return time.perf_counter() - t0, results
