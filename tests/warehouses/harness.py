"""What the warehouse scenarios see of a warehouse and of one test's pipeline."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dlt
import pytest
from dlt.common.destination import Destination

from apione_source.sandbox import Sandbox
from tests.conftest import SANDBOX_API_KEY


@dataclass
class Warehouse:
    """One warehouse (stand-in or real) as the scenarios use it.

    Attributes:
        kind: dlt destination type: ``duckdb``, ``postgres``, ``snowflake``, ``bigquery``.
        credentials: What a user puts in ``destination.<kind>.credentials`` /
            ``sources.apione.input_credentials``.
        destination_kwargs: Extra arguments of the dlt destination factory.
        types: SQL types of the input DDL: ``int``, ``text``, ``timestamp``.
        run_kwargs: Extra ``pipeline.run`` arguments.
        activate: Per-test set-up (env vars, patches) before the warehouse is used.
    """

    kind: str
    credentials: Any
    destination_kwargs: dict[str, Any] = field(default_factory=dict)
    types: dict[str, str] = field(
        default_factory=lambda: {"int": "INT", "text": "VARCHAR", "timestamp": "TIMESTAMP"}
    )
    run_kwargs: dict[str, Any] = field(default_factory=dict)
    activate: Callable[[pytest.MonkeyPatch], None] | None = None

    def destination(self) -> Destination[Any, Any]:
        return Destination.from_reference(
            self.kind, credentials=self.credentials, **self.destination_kwargs
        )

    @contextlib.contextmanager
    def sql_client(self, dataset: str) -> Iterator[Any]:
        with dlt.dataset(self.destination(), dataset).sql_client as client:
            yield client

    def drop_dataset(self, dataset: str) -> None:
        with self.sql_client(dataset) as client:
            if client.has_dataset():
                client.drop_dataset()


@dataclass
class Env:
    """One test: an input table in one warehouse, a pipeline loading into another."""

    sandbox: Sandbox
    input_wh: Warehouse
    output_wh: Warehouse
    input_dataset: str
    output_dataset: str
    pipeline: dlt.Pipeline
    _names: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def same_warehouse(self) -> bool:
        return self.input_wh is self.output_wh

    # input side -------------------------------------------------------------------------

    def input_exec(self, *statements: str) -> None:
        with self.input_wh.sql_client(self.input_dataset) as client:
            for sql in statements:
                client.execute_sql(sql)

    def input_table(self, table: str = "companies") -> str:
        key = f"input:{table}"
        if key not in self._names:
            with self.input_wh.sql_client(self.input_dataset) as client:
                self._names[key] = str(client.make_qualified_table_name(table))
        return self._names[key]

    def create_companies(self) -> None:
        t = self.input_wh.types
        with self.input_wh.sql_client(self.input_dataset) as client:
            if not client.has_dataset():
                client.create_dataset()
        self.input_exec(
            f"CREATE TABLE {self.input_table()} "
            f"(id {t['int']}, domain {t['text']}, updated_at {t['timestamp']})"
        )

    def insert_companies(self, rows: list[tuple[Any, ...]]) -> None:
        """Insert ``(id, domain)`` or ``(id, domain, 'YYYY-MM-DD HH:MM:SS')`` rows."""
        ts = self.input_wh.types["timestamp"]
        values = []
        for row in rows:
            pk, domain = row[0], row[1]
            updated = row[2] if len(row) > 2 else "2024-01-01 00:00:00"
            values.append(f"({int(pk)}, {sql_text(domain)}, CAST('{updated}' AS {ts}))")
        for start in range(0, len(values), 500):
            self.input_exec(
                f"INSERT INTO {self.input_table()} (id, domain, updated_at) VALUES "
                + ", ".join(values[start : start + 500])
            )

    # output side ------------------------------------------------------------------------

    def out(self, table: str) -> str:
        """The qualified name of a loaded table, for SQL in tests."""
        if table not in self._names:
            client = self.pipeline.sql_client()  # naming only: no connection is opened
            self._names[table] = str(client.make_qualified_table_name(table))
        return self._names[table]

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self.pipeline.sql_client() as client, client.execute_query(sql, *args) as cur:
            return [tuple(r) for r in cur.fetchall()]

    def count(self, table: str) -> int | None:
        try:
            return int(self.query(f"SELECT count(*) FROM {self.out(table)}")[0][0])
        except Exception:
            return None

    # running ----------------------------------------------------------------------------

    def run(self, **overrides: Any) -> Any:
        from apione_source import apione, run_enrichment

        kwargs: dict[str, Any] = {
            "api_key": SANDBOX_API_KEY,
            "base_url": self.sandbox.base_url,
            "enrichment_type": "company",
            "input_table": "companies",
            "primary_key": "id",
            "input_dataset": self.input_dataset,
            "input_destination": self.input_wh.kind,
            "input_credentials": self.input_wh.credentials,
            "wait_budget_seconds": 60,
        }
        kwargs.update(overrides)
        info = run_enrichment(self.pipeline, apione(**kwargs), **self.output_wh.run_kwargs)
        info.raise_on_failed_jobs()
        return info


def sql_text(value: str | None) -> str:
    """A SQL string literal every warehouse here parses the same way (or NULL)."""
    if value is None:
        return "NULL"
    if "'" in value or "\\" in value:
        raise ValueError("test data must not contain quotes or backslashes")
    return f"'{value}'"
