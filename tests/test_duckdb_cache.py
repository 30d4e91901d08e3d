"""Giving DuckDB's cache back never changes the limit a user set, nor fails a run."""

from __future__ import annotations

from pathlib import Path

import dlt
import duckdb
import pytest
from dlt.destinations.exceptions import DatabaseException

from apione_source.duckdb_cache import release_cached_pages
from apione_source.reader import _chunks


def _client(database: object, tmp_path: Path) -> object:
    pipeline = dlt.pipeline(
        "cache",
        destination=dlt.destinations.duckdb(database),
        dataset_name="d",
        pipelines_dir=str(tmp_path / "pipelines"),
    )
    return pipeline.sql_client()


def _one(client: object, sql: str) -> object:
    with client.execute_query(sql) as cur:  # type: ignore[attr-defined]
        return cur.fetchone()[0]


CACHED = "SELECT sum(memory_usage_bytes) FROM duckdb_memory()"


@pytest.mark.parametrize("limit", ["1GB", "1GiB", "3GB", "500MB", "750KB", "2TB"])
def test_the_limit_shows_as_the_user_set_it(tmp_path: Path, limit: str) -> None:
    with _client(str(tmp_path / "w.duckdb"), tmp_path) as client:  # type: ignore[attr-defined]
        client.execute_sql(f"SET memory_limit = '{limit}'")
        shown = _one(client, "SELECT current_setting('memory_limit')")
        for _ in range(3):
            release_cached_pages(client)
        assert _one(client, "SELECT current_setting('memory_limit')") == shown


def test_without_a_limit_nothing_changes(tmp_path: Path) -> None:
    """An unlimited DuckDB shows its limit in PiB, which it does not take back."""
    with _client(str(tmp_path / "w.duckdb"), tmp_path) as client:  # type: ignore[attr-defined]
        client.execute_sql("SET memory_limit = '-1'")
        shown = _one(client, "SELECT current_setting('memory_limit')")
        release_cached_pages(client)
        assert _one(client, "SELECT current_setting('memory_limit')") == shown
        # still usable: not left at 1MB
        client.execute_sql("CREATE TABLE t AS SELECT range AS i FROM range(100000)")


def test_a_limit_that_cannot_be_set_back_fails_loudly(tmp_path: Path) -> None:
    """Left at 1MB the run's next load would fail far from the cause: fail here."""
    with _client(str(tmp_path / "w.duckdb"), tmp_path) as client:  # type: ignore[attr-defined]
        client.execute_sql("SET memory_limit = '1GB'")
        real = client.execute_sql

        def refuse_the_restore(sql: str, *args: object) -> object:
            if sql.startswith("SET memory_limit") and "1MB" not in sql:
                raise DatabaseException(RuntimeError("the restore failed"))
            return real(sql, *args)

        client.execute_sql = refuse_the_restore
        with pytest.raises(DatabaseException, match="the restore failed"):
            release_cached_pages(client)


def test_an_in_memory_database_is_not_written_out(tmp_path: Path) -> None:
    with _client(duckdb.connect(":memory:"), tmp_path) as client:  # type: ignore[attr-defined]
        client.execute_sql("CREATE TABLE t AS SELECT md5(range::VARCHAR) AS s FROM range(300000)")
        before = int(_one(client, CACHED))  # type: ignore[call-overload]
        release_cached_pages(client)
        assert int(_one(client, CACHED)) == before  # type: ignore[call-overload]


def test_the_input_is_read_a_chunk_at_a_time_without_holding_it_in_memory(
    tmp_path: Path,
) -> None:
    """The read's temporary table and the query's pages are given back once it is made;
    every row still comes back, in order."""
    with _client(str(tmp_path / "w.duckdb"), tmp_path) as client:  # type: ignore[attr-defined]
        client.execute_sql("SET memory_limit = '1GB'")
        client.execute_sql(
            "CREATE TABLE big AS SELECT range AS i, md5(range::VARCHAR) || md5((-range)::VARCHAR)"
            " AS s FROM range(1000000)"
        )
        client.execute_sql("CHECKPOINT")
        chunks = _chunks(client, "SELECT i, s FROM big ORDER BY i", [], 2, 10_000)
        first = next(chunks)
        # another connection: a query on the reading one would end its read
        other = client.native_connection.cursor()
        assert int(other.execute(CACHED).fetchone()[0]) < 8_000_000
        seen = [row[0] for batch in [first, *chunks] for row in batch]
        assert seen == list(range(1_000_000))


def test_the_read_starts_without_what_earlier_statements_cached(tmp_path: Path) -> None:
    """A read's query (the freshness anti-join: the peak of a run with nothing to send)
    does not start beside the pages earlier statements left in DuckDB's cache."""
    with _client(str(tmp_path / "w.duckdb"), tmp_path) as client:  # type: ignore[attr-defined]
        client.execute_sql("SET memory_limit = '1GB'")
        client.execute_sql(
            "CREATE TABLE big AS SELECT range AS i, md5(range::VARCHAR) AS s FROM range(1000000)"
        )
        client.execute_sql("CHECKPOINT")
        _one(client, "SELECT count(DISTINCT s) FROM big")  # a scan, as the settle's
        assert int(_one(client, CACHED)) > 12_000_000  # type: ignore[call-overload]
        # the query reports what DuckDB holds as it runs
        [[held]] = list(_chunks(client, CACHED, [], 1, 10))
        assert int(held[0]) < 4_000_000
