"""Shared fixtures: local ApiOne sandboxes and a controllable clock."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dlt
import duckdb
import pytest
from dlt.common.configuration.container import Container
from dlt.common.configuration.specs.pluggable_run_context import PluggableRunContext

from apione_source.sandbox import Sandbox
from tests.e2e import Env

SANDBOX_API_KEY = "sk_test_sandbox"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        help="also run suites marked slow (crash matrix, chaos, warehouses); CI does",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class FakeClock:
    """A clock the test moves by hand; pass it as ``Sandbox(clock=...)``."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sandbox_factory() -> Iterator[Callable[..., Sandbox]]:
    """Start sandboxes with any Sandbox kwargs; all are stopped at teardown."""
    started: list[Sandbox] = []

    def make(**kwargs: Any) -> Sandbox:
        sb = Sandbox(**kwargs).start()
        started.append(sb)
        return sb

    yield make
    for sb in started:
        sb.stop()


@pytest.fixture
def sandbox(sandbox_factory: Callable[..., Sandbox]) -> Sandbox:
    """A growth-plan sandbox whose jobs complete instantly."""
    return sandbox_factory()


@pytest.fixture(autouse=True)
def _isolated_dlt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep the project's ``.dlt/config.toml`` (and ``~/.dlt``) out of these tests.

    dlt resolves every source argument not passed explicitly from config files, so a
    project config (e.g. ``input_columns = {domain = "website"}``) would change what the
    tests run. Point dlt at an empty project dir and reload its providers.
    """
    ctx = Container()[PluggableRunContext]
    original_run_dir = ctx.context.run_dir
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.setenv("DLT_PROJECT_DIR", str(project))
    monkeypatch.setenv("DLT_DATA_DIR", str(tmp_path / "dlt_data"))
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")
    ctx.reload(str(project))
    try:
        yield
    finally:
        monkeypatch.undo()
        ctx.reload(original_run_dir)


@pytest.fixture
def make_env(tmp_path: Path, sandbox_factory: Callable[..., Sandbox]) -> Callable[..., Env]:
    """Build an Env: a sandbox (any Sandbox kwargs), an input warehouse and a pipeline."""

    def make(input_ddl: str | None = None, **sandbox_kwargs: Any) -> Env:
        warehouse = tmp_path / "warehouse.duckdb"
        con = duckdb.connect(str(warehouse))
        try:
            con.execute("CREATE SCHEMA crm")
            con.execute(
                input_ddl
                or "CREATE TABLE crm.companies(id INT, domain VARCHAR, updated_at TIMESTAMP)"
            )
        finally:
            con.close()
        out = tmp_path / "destination.duckdb"
        pipeline = dlt.pipeline(
            pipeline_name="apione_e2e",
            destination=dlt.destinations.duckdb(str(out)),
            dataset_name="enriched",
            pipelines_dir=str(tmp_path / "pipelines"),
        )
        return Env(tmp_path, sandbox_factory(**sandbox_kwargs), warehouse, out, pipeline)

    return make
