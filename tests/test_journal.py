"""The write-ahead journal: what a crashed run leaves behind is found by the next one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from apione_source.errors import ConcurrentRunError
from apione_source.journal import FETCHED, IN_FLIGHT, BatchItem, Journal


def _items(*keys: str) -> list[BatchItem]:
    return [BatchItem(k, {"domain": k}, [f"pk-{k}"]) for k in keys]


def test_a_submit_answered_becomes_an_in_flight_job(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    intent = journal.begin_submit("company", 1, _items("a.com", "b.com"), now=1.0)
    job = journal.submitted(intent, "job_1", run_id="load_1", now=2.0)
    journal.close()

    reopened = Journal(tmp_path / "j.sqlite")
    assert reopened.lost_submits() == []
    [stored] = reopened.jobs(IN_FLIGHT)
    assert stored == job
    assert [i.key for i in stored.items or []] == ["a.com", "b.com"]
    assert stored.items and stored.items[0].pks == ["pk-a.com"]


def test_a_submit_without_answer_is_reported_as_lost_with_its_records(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.begin_submit("email", 2, _items("x@y.com"), now=1.0)
    journal.close()

    [lost] = Journal(tmp_path / "j.sqlite").lost_submits()
    assert (lost.type, lost.attempt, [i.key for i in lost.items]) == ("email", 2, ["x@y.com"])


def test_an_abandoned_submit_leaves_nothing(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.abandon(journal.begin_submit("company", 1, _items("a.com"), now=1.0))
    assert journal.lost_submits() == [] and journal.jobs() == []


def test_fetched_jobs_are_reopened_or_forgotten(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    for n in (1, 2):
        intent = journal.begin_submit("company", 1, _items(f"{n}.com"), now=float(n))
        journal.submitted(intent, f"job_{n}", run_id="r", now=float(n))
    journal.mark_fetched(["job_1", "job_2"], load_id="L1")
    assert {j.load_id for j in journal.jobs(FETCHED)} == {"L1"}

    journal.reopen(["job_1"])
    journal.forget(job_ids=["job_2"])
    assert [(j.job_id, j.state, j.load_id) for j in journal.jobs()] == [("job_1", IN_FLIGHT, None)]


def test_a_second_run_of_the_same_pipeline_is_refused(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    with pytest.raises(ConcurrentRunError, match="one at a time"):
        Journal(tmp_path / "j.sqlite")
    journal.close()
    Journal(tmp_path / "j.sqlite").close()  # free again once closed


def test_the_lock_dies_with_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    code = (
        "import os, signal, sys; from apione_source.journal import Journal; "
        f"Journal({str(path)!r}); os.kill(os.getpid(), signal.SIGKILL)"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False)
    assert result.returncode == -9
    Journal(path).close()
