"""A dry run: what the next run would read, reject, send and bill, without sending anything.

:func:`plan_run` runs the real run's code (:class:`apione_source.run.EnrichmentRun`) up
to the point of spending: it opens the job journal, reads the input the same way
(warehouse freshness query or history in memory), normalizes, de-duplicates and
classifies every row, and packs the records to send into jobs. Every submit is counted
instead of made, and nothing is written: no rows, no journal entries, no dlt state. It
extracts in a throwaway pipelines dir (state restored read-only from the destination),
so the real pipeline's local state is untouched, and it never loads.

Carried-over jobs are not polled: their records count as in flight. Jobs that fail or
expire during the real run are resent and billed again: a plan cannot foresee them.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import dlt

from apione_source.errors import connector_errors
from apione_source.history import KeyState
from apione_source.journal import IN_FLIGHT, SENDING, TO_SEND, BatchItem, Entry
from apione_source.run import EnrichmentRun


@dataclass
class Plan:
    """What a run would do now."""

    rows_read: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> input rows
    already_fresh: int = 0
    in_flight: int = 0  # records of carried-over jobs: collected, not paid again
    records_to_send: int = 0  # new records, each billed once
    records_to_resend: int = 0  # records of lost submits and spent jobs, billed again
    jobs: int = 0
    capped: bool = False  # max_records_per_run stops the run before the input ends
    first_run: bool = False  # nothing loaded yet in this dataset
    records_per_job: int = 0
    concurrent_jobs: int = 0

    @property
    def credits(self) -> int:
        """Records ApiOne would bill (one credit each)."""
        return self.records_to_send + self.records_to_resend

    @property
    def rounds(self) -> int:
        """Rounds of the plan's concurrent jobs: the shortest wall time, in job durations."""
        return math.ceil(self.jobs / self.concurrent_jobs) if self.jobs else 0

    def summary(self) -> dict[str, Any]:
        """Every figure, JSON-safe."""
        return {**asdict(self), "credits": self.credits, "rounds": self.rounds}

    def text(self) -> str:
        """The plan in a few lines, for a person about to spend."""
        rejected = ", ".join(f"{r} {n}" for r, n in sorted(self.rejected.items())) or "none"
        lines = [
            f"rows read        {self.rows_read}",
            f"rejected         {sum(self.rejected.values())} ({rejected})",
            f"already fresh    {self.already_fresh}",
            f"in flight        {self.in_flight} record(s) of carried-over jobs (not paid again)",
            f"to send          {self.records_to_send} new record(s)"
            + (f" + {self.records_to_resend} resent" if self.records_to_resend else ""),
            f"jobs             {self.jobs} of up to {self.records_per_job} records",
            f"credits          {self.credits} (one per record sent)",
            f"shortest time    {self.rounds} round(s) of {self.concurrent_jobs} concurrent "
            "jobs (the plan's limit), each as long as ApiOne takes for a job",
        ]
        if self.capped:
            lines.append("capped           max_records_per_run stops the run before the input ends")
        if self.first_run:
            lines.append(
                "first run        nothing was loaded into this dataset before (if that is a "
                "surprise, check the destination and dataset)"
            )
        return "\n".join(lines)


class DryRun(EnrichmentRun):
    """An :class:`EnrichmentRun` that counts what it would send and writes nothing."""

    plan: Plan
    _blocked = False  # a resend that does not fit under the cap stops every submit

    def _start(self) -> None:
        # Reading takes what it takes: the wait budget is the real run's, not the plan's.
        sched = replace(self.s.scheduler, wait_budget_seconds=float("inf"))
        self.s = replace(self.s, scheduler=sched)
        super()._start()

    def _settle_loads(self, unfinished: bool = False) -> None:
        """Nothing: the plan writes nothing, and a row loaded twice changes no count of it."""

    def _run(self, pipeline: dlt.Pipeline) -> Generator[Any, None, None]:
        sched = self.sched
        self.plan = Plan(
            records_per_job=sched.records_per_job,
            concurrent_jobs=sched.settings.concurrent_jobs,
            first_run=not self.state.get("has_history"),
        )
        journal = self.journal
        for entry in journal.in_phase(TO_SEND, SENDING, IN_FLIGHT):
            for item in entry.items:
                self.reserved[item.key] = entry
        for entry in journal.in_phase(IN_FLIGHT):
            self.plan.in_flight += len(entry.items)
        # What the real run settles first, without its writes: keys given up stay given up,
        # a submit whose answer never came is resent (what has attempts left), and records
        # already waiting to be sent go out before any new one.
        for entry in list(journal.entries.values()):
            for spent in entry.unreported:
                self._keep_given_up(spent)
        waiting: list[list[BatchItem]] = []
        for entry in journal.in_phase(SENDING):
            resend = [i for i in entry.items if i.attempt < self.s.max_attempts]
            self._give_up([i for i in entry.items if i.attempt >= self.s.max_attempts])
            waiting.append(resend)
        waiting += [e.items for e in journal.in_phase(TO_SEND)]
        size = self._piece_size()
        pieces = [items[i : i + size] for items in waiting for i in range(0, len(items), size)]
        for piece in pieces:
            if len(piece) > self._cap_left():
                # the real run sends nothing more this run (see _send_entries)
                self._blocked = True
                break
            self._count_entry(piece, resent=True)
        yield from self._read_and_submit(pipeline)
        while self.pending.items and self._submit_pending(self._cap_left()):
            pass
        stats, plan = self.stats, self.plan
        plan.rows_read, plan.already_fresh = stats.rows_read, stats.already_fresh
        plan.rejected = dict(stats.rejected)
        plan.capped = plan.capped or bool(self.pending.items)

    def _give_up(self, items: list[BatchItem]) -> None:
        """Records out of attempts end ``error`` (as :meth:`_settle` does): not sent."""
        now = self._now()
        for item in items:
            self.reserved.pop(item.key, None)
            self.known.keys[item.key] = KeyState(
                "error", now, None, item.record, set(item.pks), submitted_at=now
            )

    def _count_entry(self, items: list[BatchItem], *, resent: bool) -> None:
        jobs = math.ceil(len(items) / self.sched.records_per_job)
        self.plan.jobs += jobs
        # as submits count them: max_records_per_run stops reading where the run would
        counters = self.sched.counters
        counters.submitted_jobs += jobs
        counters.submitted_records += len(items)
        if resent:
            self.plan.records_to_resend += len(items)
        else:
            self.plan.records_to_send += len(items)

    # --- what the real run would do, counted --------------------------------------------

    def _cap(self) -> int | None:
        # what the run would bill without the credit guardrail: the plan it is checked on
        return self.s.max_records_per_run

    def _classify(self, *args: Any) -> str:
        verdict = super()._classify(*args)
        if verdict == "cap":  # the run stops reading here
            self.plan.capped = True
        return verdict

    def _emit(self, table: str, rows: list[dict[str, Any]]) -> Iterator[Any]:
        return iter(())  # nothing is loaded

    def _send_entries(self) -> None:
        pass  # counted when the journal was read

    def _submit_pending(self, limit: int) -> bool:
        if self._blocked:
            return False
        n = min(limit, self._cap_left(), self.sched.records_per_job)
        if n <= 0:
            return False
        if self.pending.items:
            items = self.pending.take(n)
            for item in items:
                self.reserved[item.key] = _PLANNED
            self._count_entry(items, resent=False)
        return True


# What a planned record is reserved by: a later row with its key joins it, as it would
# join the real job.
_PLANNED = Entry("planned", scope="", pipeline="")


def plan_run(pipeline: dlt.Pipeline, source: Any) -> Plan:
    """What running ``source`` on ``pipeline`` now would send and bill; nothing is sent.

    Args:
        pipeline: The pipeline the real run uses (its destination and dataset are read).
        source: Usually ``apione()``, configured as for the real run.

    Returns:
        The plan of its single enrichment resource.

    Raises:
        ApiOneError: What the real run would raise before sending (a wrong setting, an
            input table without the configured columns, a corrupt journal).
    """
    handles = [r.apione_run for r in source.resources.values() if hasattr(r, "apione_run")]
    if len(handles) != 1:
        raise ValueError("plan_run takes a source with one apione enrichment resource")
    handle = handles[0]
    # The real run's handle state (its run, load slicing) is put back afterwards.
    previous, sliced = handle.run, handle.sliced
    with tempfile.TemporaryDirectory(prefix="apione_plan_") as workdir:
        shadow = dlt.pipeline(
            pipeline_name=pipeline.pipeline_name,
            destination=pipeline.destination,
            dataset_name=pipeline.dataset_name,
            pipelines_dir=workdir,
        )
        shadow.sync_destination()  # state and schema as the last run left them (read only)
        handle.dry_run, handle.run, handle.sliced = True, None, False
        try:
            with connector_errors():
                shadow.extract(source)
        finally:
            run = handle.run
            if run is not None:
                run.close()
            handle.dry_run, handle.run, handle.sliced = False, previous, sliced
        if not isinstance(run, DryRun):
            raise RuntimeError("the source did not plan: is it an apione() source?")
        return run.plan
