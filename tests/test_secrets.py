"""The API key never leaks: not in logs (DEBUG, dlt and httpx included), exceptions,
dlt's trace and state, any file of the pipeline, the destination, or stdout/stderr.

The key is passed (a) as an argument and (b) through ``SOURCES__APIONE__API_KEY``
(resolved by dlt's config), and (c) a run whose key the server refuses (401) produces the
exception to inspect.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dlt
import duckdb
import httpx
import pytest

from apione_source import apione, run_enrichment
from apione_source.errors import AuthenticationError
from apione_source.sandbox import Sandbox

SECRET = "sk_live_DO_NOT_LEAK_4242"
LOGGERS = ("", "dlt", "httpx", "httpcore", "apione_source", "urllib3")


@pytest.fixture
def debug_logs(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> Iterator[pytest.LogCaptureFixture]:
    """Capture every record at DEBUG, also from loggers that do not propagate (dlt)."""
    monkeypatch.setenv("RUNTIME__LOG_LEVEL", "DEBUG")
    caplog.set_level(logging.DEBUG)
    attached = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        caplog.set_level(logging.DEBUG, logger=name)
        if name and not logger.propagate:
            logger.addHandler(caplog.handler)
            attached.append(logger)
    yield caplog
    for logger in attached:
        logger.removeHandler(caplog.handler)


def make_warehouse(path: Path, n: int = 30) -> Path:
    con = duckdb.connect(str(path))
    try:
        con.execute("CREATE SCHEMA crm")
        con.execute("CREATE TABLE crm.companies(id INT, domain VARCHAR)")
        con.executemany(
            "INSERT INTO crm.companies VALUES (?, ?)",
            [(i, f"secret-firm{i}.com") for i in range(n)] + [(999, None)],
        )
    finally:
        con.close()
    return path


def make_pipeline(tmp: Path, name: str) -> dlt.Pipeline:
    return dlt.pipeline(
        pipeline_name=name,
        destination=dlt.destinations.duckdb(str(tmp / f"{name}.duckdb")),
        dataset_name="enriched",
        pipelines_dir=str(tmp / "pipelines"),
    )


def source_kwargs(sb: Sandbox, warehouse: Path) -> dict[str, Any]:
    return {
        "base_url": sb.base_url,
        "enrichment_type": "company",
        "input_table": "companies",
        "primary_key": "id",
        "input_columns": {"domain": "domain"},
        "input_dataset": "crm",
        "input_credentials": str(warehouse),
        "wait_budget_seconds": 20,
        "records_per_job": 10,
    }


def dump_destination(path: Path) -> str:
    """Every row of every table of every schema, as text."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = con.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
        ).fetchall()
        out = []
        for schema, table in tables:
            rows = con.execute(f'SELECT * FROM "{schema}"."{table}"').fetchall()
            out.append(f"{schema}.{table}: {rows!r}")
        return "\n".join(out)
    finally:
        con.close()


def assert_no_leak(where: str, text: str | bytes) -> None:
    needle: Any = SECRET.encode() if isinstance(text, bytes) else SECRET
    assert needle not in text, f"the API key leaks in {where}"


def assert_pipeline_does_not_leak(pipeline: dlt.Pipeline, tmp: Path) -> None:
    trace = pipeline.last_trace
    assert trace is not None
    assert_no_leak("str(pipeline.last_trace)", str(trace))
    assert_no_leak("repr(pipeline.last_trace)", repr(trace))
    assert_no_leak("last_trace.asdict()", json.dumps(trace.asdict(), default=str))
    for value in trace.resolved_config_values:
        assert_no_leak(f"trace resolved value {value.key}", repr(value))
    assert_no_leak("pipeline.state", json.dumps(pipeline.state, default=str))
    # every file the pipeline (or anything else in this test) wrote: packages, state,
    # schemas, trace.pickle, the journal, the destination, the input warehouse
    files = [p for p in tmp.rglob("*") if p.is_file()]
    for path in files:
        assert_no_leak(str(path.relative_to(tmp)), path.read_bytes())
    dest = Path(pipeline.destination.config_params["credentials"])
    tables = dump_destination(dest)
    assert "._apione_journal: " in tables  # the job journal lives in the destination
    assert_no_leak("destination tables", tables)


def assert_logs_do_not_leak(caplog: pytest.LogCaptureFixture) -> None:
    assert caplog.records, "nothing was logged: the capture is broken"
    for record in caplog.records:
        assert_no_leak(f"log record of {record.name}", record.getMessage())
        assert_no_leak(f"log record of {record.name} (args)", repr(record.args))
        if record.exc_info:
            assert_no_leak(
                "logged traceback", "".join(traceback.format_exception(*record.exc_info))
            )
    assert_no_leak("caplog.text", caplog.text)


@pytest.mark.parametrize("how", ["argument", "env_var"])
def test_given_distinctive_key_when_run_then_it_appears_nowhere(
    how: str,
    tmp_path: Path,
    sandbox_factory: Callable[..., Sandbox],
    debug_logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sb = sandbox_factory(api_key=SECRET)
    warehouse = make_warehouse(tmp_path / "warehouse.duckdb")
    pipeline = make_pipeline(tmp_path, f"secrets_{how}")
    kwargs = source_kwargs(sb, warehouse)
    if how == "argument":
        kwargs["api_key"] = SECRET
    else:
        monkeypatch.setenv("SOURCES__APIONE__API_KEY", SECRET)

    info = run_enrichment(pipeline, apione(**kwargs))
    info.raise_on_failed_jobs()

    # the run really used the key: everything was enriched
    assert sb.usage()["records_billed"] == 30
    if how == "env_var":
        resolved = {v.key for v in pipeline.last_trace.resolved_config_values}
        assert "api_key" in resolved, "the key was not resolved through dlt config"
    assert_no_leak("str(load info)", str(info))
    assert_pipeline_does_not_leak(pipeline, tmp_path)
    assert_logs_do_not_leak(debug_logs)
    out, err = capsys.readouterr()
    assert_no_leak("stdout", out)
    assert_no_leak("stderr", err)


def test_given_refused_key_when_run_then_the_401_error_and_everything_else_do_not_leak_it(
    tmp_path: Path,
    sandbox_factory: Callable[..., Sandbox],
    debug_logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sb = sandbox_factory(api_key="sk_test_the_right_one")
    warehouse = make_warehouse(tmp_path / "warehouse.duckdb")
    pipeline = make_pipeline(tmp_path, "secrets_401")
    monkeypatch.setenv("SOURCES__APIONE__API_KEY", SECRET)

    with pytest.raises(AuthenticationError) as raised:
        run_enrichment(pipeline, apione(**source_kwargs(sb, warehouse)))

    exc = raised.value
    assert "SOURCES__APIONE__API_KEY" in str(exc)
    assert_no_leak("str(exception)", str(exc))
    assert_no_leak("repr(exception)", repr(exc))
    assert_no_leak("exception args", repr(exc.args))
    assert_no_leak("traceback", "".join(traceback.format_exception(exc)))
    assert_no_leak("pytest's exception info", str(raised.getrepr(showlocals=False)))
    assert sb.usage()["records_billed"] == 0
    assert_pipeline_does_not_leak(pipeline, tmp_path)
    assert_logs_do_not_leak(debug_logs)
    out, err = capsys.readouterr()
    assert_no_leak("stdout", out)
    assert_no_leak("stderr", err)


# --- a failure inside the resource: tracebacks rendered with their locals --------------------


def _exceptions(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception chained to it (causes, contexts, group members)."""
    stack, seen = [exc], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [e for e in (current.__cause__, current.__context__) if e is not None]
        stack += list(getattr(current, "exceptions", ()))


def _frames(exc: BaseException) -> Iterator[Any]:
    for current in _exceptions(exc):
        tb = current.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next


def _slots(obj: object) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for klass in type(obj).__mro__:
        names = getattr(klass, "__slots__", ())
        for name in (names,) if isinstance(names, str) else names:
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                found[name] = getattr(obj, name)
    return found


def _find_key(obj: Any, path: str, depth: int, seen: set[int]) -> Iterator[str]:
    """Paths under ``obj`` (attributes, items; ``depth`` levels) to a str or bytes with the key."""
    if isinstance(obj, str):
        if SECRET in obj:
            yield path
        return
    if isinstance(obj, (bytes, bytearray, memoryview)):
        if SECRET.encode() in bytes(obj):
            yield path
        return
    if depth == 0 or id(obj) in seen or isinstance(obj, (int, float, type)):
        return
    seen.add(id(obj))
    children: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        for key, value in list(obj.items()):
            children += [(f"{path}[{key!r}] (key)", key), (f"{path}[{key!r}]", value)]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children += [(f"{path}[{i}]", item) for i, item in enumerate(list(obj))]
    else:
        try:
            attrs = dict(vars(obj))
        except TypeError:
            attrs = {}
        attrs.update(_slots(obj))
        children += [(f"{path}.{name}", value) for name, value in attrs.items()]
    for child_path, child in children:
        yield from _find_key(child, child_path, depth - 1, seen)


def _run_failing_inside_the_resource(base_url: str, warehouse: Path, tmp: Path) -> BaseException:
    """Run the source until the transport breaks mid-run; return what the run raised.

    The key only comes from the environment and the exception is caught here, so no frame
    of the test itself (which holds the sandbox, and the sandbox the key) is in the way.
    """
    pipeline = make_pipeline(tmp, "secrets_traceback")
    try:
        run_enrichment(pipeline, apione(**source_kwargs_for(base_url, warehouse)))
    except Exception as exc:  # whatever dlt wraps it in
        return exc
    raise AssertionError("the run did not fail")


def source_kwargs_for(base_url: str, warehouse: Path) -> dict[str, Any]:
    return {
        "base_url": base_url,
        "enrichment_type": "company",
        "input_table": "companies",
        "primary_key": "id",
        "input_columns": {"domain": "domain"},
        "input_dataset": "crm",
        "input_credentials": str(warehouse),
        "wait_budget_seconds": 20,
        "records_per_job": 10,
    }


def test_given_failure_inside_the_resource_when_traceback_has_locals_then_no_key(
    tmp_path: Path,
    sandbox_factory: Callable[..., Sandbox],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sb = sandbox_factory(api_key=SECRET)
    base_url = sb.base_url
    del sb  # the sandbox holds the key: keep it out of this frame's locals
    warehouse = make_warehouse(tmp_path / "warehouse.duckdb")
    monkeypatch.setenv("SOURCES__APIONE__API_KEY", SECRET)
    real_send = httpx.AsyncHTTPTransport.handle_async_request
    sent_keys: list[bool] = []

    async def breaks_on_poll(
        self: httpx.AsyncHTTPTransport, request: httpx.Request
    ) -> httpx.Response:
        sent_keys.append(request.headers.get("X-API-Key") == SECRET)
        if "/async/status/" in request.url.path:
            raise RuntimeError("transport broke while polling")
        return await real_send(self, request)

    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", breaks_on_poll)

    exc = _run_failing_inside_the_resource(base_url, warehouse, tmp_path)

    assert sent_keys and all(sent_keys), "the key was not sent: the run did not get far"
    assert any(isinstance(e, RuntimeError) for e in _exceptions(exc)), repr(exc)
    frames = list(_frames(exc))
    names = {frame.f_code.co_name for frame in frames}
    assert "enrichment" in names, "the resource's frame is not in the traceback"
    assert "breaks_on_poll" in names, "the client's frames are not in the traceback"
    rendered = "".join(
        traceback.TracebackException.from_exception(exc, capture_locals=True).format()
    )
    assert_no_leak("traceback with locals", rendered)
    assert "Secret('***')" in rendered  # the resource's frame shows its (masked) key
    assert_no_leak("traceback", "".join(traceback.format_exception(exc)))
    leaks = [
        path
        for frame in frames
        for path in _find_key(
            dict(frame.f_locals), f"{frame.f_code.co_name}()", depth=5, seen=set()
        )
        # Known, in dlt and not ours to change: dlt's config injection keeps the last
        # resolved config of a decorated function on the function itself
        # (dlt.common.configuration.inject.set_fun_last_config), reachable from the
        # source as ``source._factory._f._dlt_config.api_key``. Not in any repr.
        if "._f._dlt_config.api_key" not in path
    ]
    assert leaks == [], f"the API key is reachable from a traceback frame: {leaks}"
