"""The dlt source: config resolution, validation, and the resource with its table hints.

Every argument of :func:`apione` resolves the dlt way, from ``.dlt/config.toml``,
``.dlt/secrets.toml`` or environment variables, under ``[sources.apione]``
(env: ``SOURCES__APIONE__<ARG>``). See the README for every key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import dlt
from dlt.common.destination import Destination
from dlt.common.destination.reference import TDestinationReferenceArg
from dlt.common.runtime import signals
from dlt.common.typing import TSecretValue
from dlt.extract.resource import DltResource

from apione_source.client import ApiOneClient, AsyncApiOneClient
from apione_source.deliveries import DeliveryInbox, DeliveryStore
from apione_source.errors import ConfigurationError, CreditLimitError, connector_errors
from apione_source.history import Ttls
from apione_source.models import EnrichmentType
from apione_source.plan import DryRun, plan_run
from apione_source.reader import InputReader, InputSpec, check_identifier
from apione_source.run import EnrichmentRun, RunSettings
from apione_source.scheduler import SchedulerSettings
from apione_source.secret import Secret
from apione_source.settings import DEFAULT_BASE_URL, MAX_RECORDS_PER_JOB, get_plan
from apione_source.tables import TableNames, apply_table_hints

#: ApiOne input field -> input column, when ``input_columns`` is not configured.
DEFAULT_INPUT_COLUMNS: dict[EnrichmentType, dict[str, str]] = {
    EnrichmentType.COMPANY: {"domain": "domain"},
    EnrichmentType.EMAIL: {"email": "email"},
    EnrichmentType.PEOPLE: {
        "email": "email",
        "linkedin_url": "linkedin_url",
        "first_name": "first_name",
        "last_name": "last_name",
        "domain": "domain",
    },
}
_REQUIRED_FIELDS: dict[EnrichmentType, Sequence[set[str]]] = {
    EnrichmentType.COMPANY: [{"domain"}],
    EnrichmentType.EMAIL: [{"email"}],
    EnrichmentType.PEOPLE: [{"email"}, {"linkedin_url"}, {"first_name", "last_name", "domain"}],
}


def _enrichment_type(value: str) -> EnrichmentType:
    try:
        return EnrichmentType(str(value).strip().lower())
    except ValueError:
        raise ConfigurationError(
            f"unknown enrichment_type {value!r}: set sources.apione.enrichment_type to one of "
            f"{', '.join(t.value for t in EnrichmentType)}"
        ) from None


def _input_columns(etype: EnrichmentType, configured: dict[str, str] | None) -> dict[str, str]:
    columns = dict(configured or DEFAULT_INPUT_COLUMNS[etype])
    allowed = set(DEFAULT_INPUT_COLUMNS[etype])
    unknown = sorted(set(columns) - allowed)
    if unknown:
        raise ConfigurationError(
            f"sources.apione.input_columns maps unknown ApiOne field(s) {', '.join(unknown)} "
            f"for {etype.value}: allowed {', '.join(sorted(allowed))}"
        )
    if not any(req <= set(columns) for req in _REQUIRED_FIELDS[etype]):
        options = " or ".join("+".join(sorted(r)) for r in _REQUIRED_FIELDS[etype])
        raise ConfigurationError(
            f"sources.apione.input_columns must map {options} for {etype.value} enrichment"
        )
    return columns


def _inbox(url: str | None, secret: Any, store: str | None) -> DeliveryInbox | None:
    """The deliveries a run collects from, when webhooks are configured."""
    if store is None:
        return None
    if not secret or not str(secret).strip():
        raise ConfigurationError(
            "sources.apione.webhook_store is set without webhook_secret: deliveries cannot "
            "be trusted unchecked (set SOURCES__APIONE__WEBHOOK_SECRET)"
        )
    if not url:
        raise ConfigurationError(
            "sources.apione.webhook_store is set without webhook_url: ApiOne would deliver "
            "nothing there"
        )
    return DeliveryInbox(DeliveryStore(store), Secret(str(secret)))


def _check_ranges(**values: tuple[float | None, float, float | None]) -> None:
    """Raise a ConfigurationError naming the first setting outside its range."""
    for name, (value, low, high) in values.items():
        if value is None:
            continue
        if value < low or (high is not None and value > high):
            upper = f" and at most {high}" if high is not None else ""
            raise ConfigurationError(
                f"sources.apione.{name} must be at least {low}{upper}, got {value}"
            )


@dlt.source(name="apione", section="apione", max_table_nesting=2)
def apione(
    api_key: str = dlt.secrets.value,
    enrichment_type: str = dlt.config.value,
    input_table: str = dlt.config.value,
    primary_key: str = dlt.config.value,
    input_columns: dict[str, str] | None = None,
    input_dataset: str = "main",
    input_destination: TDestinationReferenceArg = "duckdb",
    input_credentials: TSecretValue | None = None,
    cursor_column: str | None = None,
    base_url: str = DEFAULT_BASE_URL,
    plan: str = "growth",
    records_per_job: int | None = None,
    concurrent_jobs: int | None = None,
    retention_seconds: int | None = None,
    ttl_matched_days: float = 90.0,
    ttl_not_found_days: float = 14.0,
    ttl_error_days: float = 1.0,
    max_records_per_run: int | None = None,
    max_credits_per_run: int | None = None,
    wait_budget_seconds: float = 900.0,
    job_timeout_seconds: float = 6 * 3600.0,
    unreachable_seconds: float = 60.0,
    max_attempts: int = 3,
    webhook_url: str | None = None,
    webhook_secret: TSecretValue | None = None,
    webhook_store: str | None = None,
    table_prefix: str = "apione_",
    scd2: bool = False,
    chunk_size: int = 10_000,
    records_per_load: int = 34_000,
) -> DltResource:
    """Enrich the rows of a warehouse table with ApiOne and load the results.

    Args:
        api_key: ApiOne API key (a secret: ``[sources.apione] api_key`` in secrets.toml).
        enrichment_type: ``company``, ``people`` or ``email``.
        input_table: Table holding the rows to enrich.
        primary_key: Column identifying an input row.
        input_columns: ApiOne input field -> column (defaults: same names).
        input_dataset: Dataset / schema of the input table.
        input_destination: dlt destination type (or instance) holding the input table.
        input_credentials: Credentials of the input warehouse (default: that
            destination's own config, ``destination.<type>.credentials``).
        cursor_column: Optional column that grows when a row is added or changed; without
            it every run scans the table (only keys without a fresh outcome are sent).
        base_url: ApiOne API base URL.
        plan: ApiOne plan: free, starter, growth or scale (sets the limits below).
        records_per_job: Override of the plan's records per job.
        concurrent_jobs: Override of the plan's concurrent jobs.
        retention_seconds: Override of the plan's result retention.
        ttl_matched_days: Days a matched (or invalid) result stays fresh.
        ttl_not_found_days: Days a not_found result stays fresh.
        ttl_error_days: Days an ``error`` result (a per-record failure, or a record given
            up on after ``max_attempts``) stays fresh.
        max_records_per_run: Cap on records submitted per run (None: no cap).
        max_credits_per_run: A guardrail: ``run_enrichment`` first plans the run (a dry
            run, :func:`apione_source.plan.plan_run`) and fails with ``CreditLimitError``
            before sending anything if it would bill more; the run itself never submits
            beyond it either (None: no guardrail).
        wait_budget_seconds: How long a run waits for jobs; the rest carry over.
        job_timeout_seconds: A job running longer is given up and its records resubmitted.
        unreachable_seconds: The run fails once ApiOne's host has given no answer at all
            for this long (after each call's own retries).
        max_attempts: Attempts per record (failed / expired jobs) before an ``error``.
        webhook_url: Passed to ApiOne with every job: where ApiOne delivers a finished
            job (``apione-dlt webhooks serve`` receives it).
        webhook_secret: The account's webhook secret (a secret), with ``webhook_store``.
        webhook_store: The folder (path or fsspec URL) where the receiver keeps
            deliveries: jobs delivered there are collected without polling; late or
            missing deliveries fall back to polling. Needs ``webhook_secret``.
        table_prefix: Prefix of every table name.
        scd2: Keep the enrichment table's history with dlt's scd2 merge strategy.
        chunk_size: Input rows read per query round trip.
        records_per_load: With ``run_enrichment``, results are loaded every this many
            records while the next jobs run (one load package each; up to twice this
            many when ApiOne finishes jobs faster than their rows are written: a
            package ends when nothing waits to be collected or submitted); a plain
            ``pipeline.run`` loads the whole run as one package. A package's load is the
            run's memory peak: 34,000 keeps 100k records under 600 MB on DuckDB.

    Returns:
        The ``<type>_enrichment`` resource (e.g. ``company_enrichment``), which loads
        the tables listed in ``tables.py``.

    Raises:
        ConfigurationError: Before any API call, when a setting is wrong.
    """
    if not api_key or not str(api_key).strip():
        raise ConfigurationError(
            "sources.apione.api_key is empty: set it in .dlt/secrets.toml "
            "or the env var SOURCES__APIONE__API_KEY"
        )
    secret = Secret(str(api_key))  # masked in any repr; the resource captures only this
    del api_key
    etype = _enrichment_type(enrichment_type)
    the_plan = get_plan(plan)
    per_job = the_plan.records_per_job if records_per_job is None else records_per_job
    slots = the_plan.concurrent_jobs if concurrent_jobs is None else concurrent_jobs
    retention = the_plan.retention_seconds if retention_seconds is None else retention_seconds
    _check_ranges(
        records_per_job=(per_job, 1, MAX_RECORDS_PER_JOB),
        concurrent_jobs=(slots, 1, None),
        max_attempts=(max_attempts, 1, None),
        chunk_size=(chunk_size, 1, None),
        records_per_load=(records_per_load, 1, None),
        max_records_per_run=(max_records_per_run, 1, None),
        max_credits_per_run=(max_credits_per_run, 1, None),
        wait_budget_seconds=(wait_budget_seconds, 0, None),
        job_timeout_seconds=(job_timeout_seconds, 1, None),
        ttl_matched_days=(ttl_matched_days, 0, None),
        ttl_not_found_days=(ttl_not_found_days, 0, None),
        ttl_error_days=(ttl_error_days, 0, None),
        unreachable_seconds=(unreachable_seconds, 1, None),
        retention_seconds=(retention, 1, None),
    )
    names = TableNames(check_identifier("table_prefix", table_prefix), etype)
    destination = input_destination
    if input_credentials is not None and isinstance(input_destination, str):
        destination = Destination.from_reference(input_destination, credentials=input_credentials)
    reader = InputReader(
        InputSpec(
            destination=destination,
            dataset=input_dataset,
            table=input_table,
            primary_key=primary_key,
            columns=_input_columns(etype, input_columns),
            cursor_column=cursor_column,
        ),
        chunk_size=chunk_size,
    )
    inbox = _inbox(webhook_url, webhook_secret, webhook_store)
    resource_name = f"{etype.value}_enrichment"
    settings = RunSettings(
        enrichment_type=etype,
        resource_name=resource_name,
        names=names,
        scheduler=SchedulerSettings(
            records_per_job=per_job,
            concurrent_jobs=slots,
            wait_budget_seconds=wait_budget_seconds,
            job_timeout_seconds=job_timeout_seconds,
            unreachable_seconds=unreachable_seconds,
            webhook_url=webhook_url,
        ),
        ttls=Ttls(
            matched=timedelta(days=ttl_matched_days),
            not_found=timedelta(days=ttl_not_found_days),
            error=timedelta(days=ttl_error_days),
        ),
        max_records_per_run=max_records_per_run,
        # also a hard cap: input that grew after the plan is not sent
        max_credits_per_run=max_credits_per_run,
        max_attempts=max_attempts,
        retention_seconds=retention,
        scd2=scd2,
        inbox=inbox,
    )

    handle = RunHandle(records_per_load, max_credits_per_run)
    handle.settings = settings  # for apione-dlt status
    handle.connect = lambda: ApiOneClient(secret, base_url)

    def enrichment() -> Any:
        if handle.run is None or handle.run.finished:
            if handle.run is not None:
                handle.run.close()  # it may hold its journal's connection still
            client = AsyncApiOneClient(secret, base_url, max_connections=slots + 4)
            kind = DryRun if handle.dry_run else EnrichmentRun
            handle.run = kind(settings, client, reader)
        handle.run.records_per_load = handle.records_per_load if handle.sliced else None
        yield from handle.run

    resource = dlt.resource(enrichment, name=resource_name, write_disposition="append")
    apply_table_hints(resource, names, scd2)
    resource.apione_run = handle  # type: ignore[attr-defined]
    return resource


def run_enrichment(pipeline: dlt.Pipeline, source: Any, **run_kwargs: Any) -> Any:
    """Run ``source`` after finishing whatever an interrupted run left behind.

    ``pipeline.run`` loads pending packages *instead of* extracting when a previous run
    died after extract; calling it once more makes one scheduled run do both. A plain
    ``pipeline.run(apione())`` fails the same way (``PipelineStepFailed``); this raises
    the connector's own error, which says what to do.

    Args:
        pipeline: The pipeline.
        source: Usually ``apione()``.
        **run_kwargs: Passed to ``pipeline.run``.

    Returns:
        The ``LoadInfo`` of the run that extracted ``source``.

    Raises:
        StopRunError: The run could not do its job (401, 402, 403, unreachable API, a
            refused request); jobs in flight and collected results are picked up by the
            next run.
        ConfigurationError: A setting is wrong (checked before any API call).
    """
    handles = [
        h
        for r in getattr(source, "resources", {}).values()
        if isinstance(h := getattr(r, "apione_run", None), RunHandle)
    ]
    for handle in handles:
        handle.sliced = True
    try:
        # One interception for the whole run: dlt's own (around a package's load) and the
        # run's (around each slice) nest in it instead of forgetting a SIGTERM that came
        # between slices; the run then stops before the next slice submits anything.
        with connector_errors(), signals.intercepted_signals():
            if pipeline.has_pending_data:
                pipeline.run()
            _check_credits(pipeline, source, handles)
            info = pipeline.run(source, **run_kwargs)
            # the same run goes on, one load package per records_per_load results
            while any(h.run is not None and not h.run.finished for h in handles):
                signals.raise_if_signalled()
                info = pipeline.run(source, **run_kwargs)
            for handle in handles:
                handle.after_last_load(pipeline)
            return info
    finally:
        for handle in handles:
            handle.close()


def _check_credits(pipeline: dlt.Pipeline, source: Any, handles: list[RunHandle]) -> None:
    """Plan the run when it has a credit limit; fail before sending anything beyond it."""
    limits = [h.max_credits for h in handles if h.max_credits is not None]
    if not limits:
        return
    plan = plan_run(pipeline, source)
    if plan.credits > limits[0]:
        raise CreditLimitError(
            f"this run would bill {plan.credits} credits, more than max_credits_per_run "
            f"({limits[0]}); nothing was sent. Raise the limit, or cap each run with "
            f"max_records_per_run. The plan:\n{plan.text()}",
            plan,
        )


class RunHandle:
    """The run of one ``apione()`` source object, kept across ``pipeline.run`` calls.

    ``run_enrichment`` sets :attr:`sliced`: the run then ends an extract every
    ``records_per_load`` results and goes on at the next ``pipeline.run``.
    """

    def __init__(self, records_per_load: int, max_credits: int | None = None) -> None:
        """No run yet; the first extract starts it."""
        self.records_per_load = records_per_load
        self.max_credits = max_credits
        self.sliced = False
        self.dry_run = False  # plan_run: count what would be sent, send nothing
        self.settings: RunSettings | None = None
        self.connect: Callable[[], ApiOneClient] | None = None
        self.run: EnrichmentRun | None = None

    def after_last_load(self, pipeline: dlt.Pipeline) -> None:
        """The run's last package loaded: see :meth:`EnrichmentRun.after_last_load`."""
        if self.run is not None:
            self.run.after_last_load(pipeline)

    def close(self) -> None:
        """Stop slicing; end a run left between slices (a failed load, say)."""
        self.sliced = False
        if self.run is not None:
            self.run.close()


def run_summaries(pipeline: dlt.Pipeline) -> dict[str, dict[str, Any]]:
    """What the last run of each enrichment resource did, from dlt's trace.

    The same counters are in the ``<prefix>runs`` table. Format one with
    :func:`apione_source.run.summary_text`.

    Returns:
        Resource name (e.g. ``company_enrichment``) -> summary; empty when the last run
        extracted nothing (it only loaded pending packages, say).
    """
    trace = pipeline.last_trace
    info = trace.last_extract_info if trace else None
    found: dict[str, dict[str, Any]] = {}
    for steps in info.metrics.values() if info else ():
        for step in steps:
            for name, metrics in step["resource_metrics"].items():
                if metrics.custom_metrics.get("rows_read") is not None:
                    found[name] = dict(metrics.custom_metrics)
    return found
