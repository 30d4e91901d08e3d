"""Opening the journal in the warehouse: finished entries are forgotten without reading their
records (a run's journal holds every record it sent), open ones are read whole."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dlt
import pytest
from dlt.destinations.exceptions import DatabaseTransientException

from apione_source.errors import JournalCorruptError
from apione_source.journal import COLUMNS, IN_FLIGHT, BatchItem, Journal, SqlStore

SCOPE = "apione_companies_outcomes"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    pipeline = dlt.pipeline(
        "journal_open",
        destination=dlt.destinations.duckdb(str(tmp_path / "w.duckdb")),
        dataset_name="enriched",
        pipelines_dir=str(tmp_path / "pipelines"),
    )
    with SqlStore(pipeline.sql_client, "_apione_journal", "duckdb") as opened:
        yield opened


def _journal(store: SqlStore, run: str) -> Journal:
    return Journal(store, SCOPE, "p", run, clock=lambda: 1.0)


def _sent(journal: Journal, n: int, job_id: str) -> str:
    entry = journal.new_entry()
    items = [
        BatchItem(f"{job_id}-{i}.com", {"domain": f"{job_id}-{i}.com"}, [str(i)]) for i in range(n)
    ]
    journal.send(entry, items)
    journal.job_created(entry, job_id)
    return entry.entry_id


def _first_run(store: SqlStore) -> Journal:
    journal = _journal(store, "run1")
    journal.open(lambda loads: set())
    return journal


def _spoil_items(store: SqlStore, entry_id: str) -> None:
    """An entry's `send` row with records nobody can read."""
    store._client.execute_sql(
        "UPDATE enriched._apione_journal SET items = 'not json' WHERE entry_id = %s", entry_id
    )


def test_given_a_loaded_entry_with_unreadable_records_when_opened_then_forgotten_unread(
    store: SqlStore,
) -> None:
    first = _first_run(store)
    loaded = _sent(first, 3, "job_loaded")
    running = _sent(first, 2, "job_running")
    first.collected([first.entries[loaded]], "run1")
    _spoil_items(store, loaded)  # never read again: its results are in a completed load

    second = _journal(store, "run2")
    second.open(lambda loads: loads & {"run1"})

    assert list(second.entries) == [running]
    entry = second.entries[running]
    assert entry.phase == IN_FLIGHT and entry.job_id == "job_running"
    assert [i.key for i in entry.items] == ["job_running-0.com", "job_running-1.com"]
    assert {r["entry_id"] for r in store.read(SCOPE)} == {running}  # the loaded one deleted


def test_given_an_open_entry_with_unreadable_records_when_opened_then_the_run_fails(
    store: SqlStore,
) -> None:
    first = _first_run(store)
    running = _sent(first, 2, "job_running")
    _spoil_items(store, running)

    with pytest.raises(JournalCorruptError, match=running):
        _journal(store, "run2").open(lambda loads: set())


def test_given_more_open_entries_than_one_query_takes_when_opened_then_all_read(
    store: SqlStore,
) -> None:
    first = _first_run(store)
    ids = {_sent(first, 1, f"job{i}") for i in range(250)}  # 100 ids per query

    second = _journal(store, "run2")
    second.open(lambda loads: set())

    assert set(second.entries) == ids
    assert all(len(e.items) == 1 and e.phase == IN_FLIGHT for e in second.entries.values())


@pytest.mark.parametrize(
    ("error", "level"),
    [
        (
            "TransactionContext Error: Cannot CHECKPOINT: there are other write transactions",
            "DEBUG",
        ),
        ("IO Error: No space left on device", "WARNING"),
    ],
)
def test_given_a_checkpoint_fails_then_the_run_goes_on_and_only_a_real_failure_warns(
    store: SqlStore,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    error: str,
    level: str,
) -> None:
    """The CHECKPOINT after a slice's load is best effort: DuckDB refuses it while another
    transaction is open (the input read from the same file); journal writes go on."""
    journal = _first_run(store)
    client = store._client
    execute = client.execute_sql

    def refusing(sql: str, *args: object) -> object:
        if sql == "CHECKPOINT":
            raise DatabaseTransientException(Exception(error))
        return execute(sql, *args)

    monkeypatch.setattr(client, "execute_sql", refusing)
    with caplog.at_level("DEBUG", logger="apione_source.journal"):
        store.checkpoint()  # never raises
    (record,) = [r for r in caplog.records if "no checkpoint" in r.getMessage()]
    assert record.levelname == level

    entry_id = _sent(journal, 3, "job_after_refusal")
    monkeypatch.undo()
    store.checkpoint()  # a real one: done, and the journal reads back whole
    reopened = _journal(store, "run2")
    reopened.open(lambda loads: set())
    assert reopened.entries[entry_id].phase == IN_FLIGHT
    assert len(reopened.entries[entry_id].items) == 3


@pytest.mark.parametrize("dialect", ["duckdb", "postgres"], ids=["arrow", "parameters"])
def test_rows_read_back_exactly_as_written(tmp_path: Path, dialect: str) -> None:
    """On DuckDB the rows go in as one arrow table, elsewhere as parameters: the same
    values come back either way, awkward text and big numbers included."""
    pipeline = dlt.pipeline(
        "journal_rows",
        destination=dlt.destinations.duckdb(str(tmp_path / "w.duckdb")),
        dataset_name="enriched",
        pipelines_dir=str(tmp_path / "pipelines"),
    )
    rows = [
        {
            **dict.fromkeys(COLUMNS, ""),
            "entry_id": f"e'{i}",
            "seq": 2**62 + i,
            "gen": i,
            "scope": SCOPE,
            "error": 'it\'s "quoted", é, 日本, \\n, %s, ?',
            "items": '[["a.com", {"domain": "a.com"}, ["1"], 1]]',
            "written_at": 1795943834.123456 + i,
        }
        for i in range(3)
    ]
    with SqlStore(pipeline.sql_client, "_apione_journal", dialect) as store:
        store.append(rows)
        store.append(rows[:1])
        back = store.read(SCOPE)
    assert sorted(back, key=lambda r: r["gen"]) == [rows[0], rows[0], *rows[1:]]


def test_a_checkpoint_empties_the_staging_copies_it_is_given_and_nothing_else(
    tmp_path: Path,
) -> None:
    pipeline = dlt.pipeline(
        "journal_checkpoint",
        destination=dlt.destinations.duckdb(str(tmp_path / "w.duckdb")),
        dataset_name="enriched",
        pipelines_dir=str(tmp_path / "pipelines"),
    )
    rows = [{"id": i} for i in range(3)]
    for table in ("ours", "theirs"):
        pipeline.run(rows, table_name=table, write_disposition="merge", primary_key="id")

    with SqlStore(pipeline.sql_client, "_apione_journal", "duckdb") as store:
        store.checkpoint(staging_tables={"ours", "not_created_yet"})

    with pipeline.sql_client() as client:

        def count(table: str) -> int:
            with client.execute_query(f"SELECT count(*) FROM {table}") as cur:
                return int(cur.fetchone()[0])

        assert count("enriched_staging.ours") == 0
        assert count("enriched_staging.theirs") == 3  # not named: left as dlt left it
        assert count("enriched.ours") == count("enriched.theirs") == 3


def _one(client: Any, sql: str) -> Any:
    with client.execute_query(sql) as cur:
        return cur.fetchone()[0]


CACHED = "SELECT sum(memory_usage_bytes) FROM duckdb_memory()"  # what DuckDB holds


def test_a_checkpoint_lets_duckdb_give_back_what_it_cached_and_keeps_the_users_limit(
    store: SqlStore,
) -> None:
    """DuckDB would keep every page a run wrote until its memory_limit; after a slice's
    checkpoint the run holds none of them, and the limit the user set is unchanged."""
    client = store._client
    client.execute_sql("SET memory_limit = '1GB'")  # the user's

    limit = _one(client, "SELECT current_setting('memory_limit')")
    client.execute_sql(
        "CREATE TABLE enriched.big AS SELECT md5(i::VARCHAR) || md5((-i)::VARCHAR) AS s"
        " FROM range(1000000) t(i)"
    )
    client.execute_sql("CHECKPOINT")  # written: DuckDB keeps the pages anyway
    assert _one(client, "SELECT count(DISTINCT s) FROM enriched.big") == 1_000_000
    assert int(_one(client, CACHED)) > 20_000_000

    store.checkpoint()

    assert int(_one(client, CACHED)) < 4_000_000
    assert _one(client, "SELECT current_setting('memory_limit')") == limit
    assert _one(client, "SELECT count(DISTINCT s) FROM enriched.big") == 1_000_000  # from the file


def test_a_checkpoint_starts_with_the_packages_rows_out_of_memory(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows a load appends to a table are held in memory (and logged in the WAL) until the
    checkpoint writes them. Held there while it adds every block it writes, they made a
    1M run's peak: the checkpoint is to start with them in DuckDB's temporary files, and
    write them into the file all the same."""
    client = store._client
    client.execute_sql("SET memory_limit = '1GB'")  # the user's

    rows = "SELECT md5(i::VARCHAR) || md5((-i)::VARCHAR) AS s FROM range({}) t(i)"
    client.execute_sql(f"CREATE TABLE enriched.big AS {rows.format(1)}")
    client.execute_sql("CHECKPOINT")
    for _ in range(3):
        # as a package's load appends: each insert below a row group, so the rows stay in
        # memory (a bigger one DuckDB would write straight into the file)
        client.execute_sql(f"INSERT INTO enriched.big {rows.format(100_000)}")
    path = _one(
        client, "SELECT path FROM duckdb_databases() WHERE database_name = current_database()"
    )
    wal = Path(f"{path}.wal")
    assert wal.stat().st_size > 5_000_000
    held = int(_one(client, CACHED))
    assert held > 20_000_000
    at_checkpoint: list[int] = []
    done: list[bool] = []
    execute = client.execute_sql

    def measuring(sql: str, *args: object) -> object:
        if sql == "CHECKPOINT":
            at_checkpoint.append(int(_one(client, CACHED)))
            result = execute(sql, *args)
            done.append(True)
            return result
        return execute(sql, *args)

    monkeypatch.setattr(client, "execute_sql", measuring)
    store.checkpoint()
    monkeypatch.undo()

    assert done, "the checkpoint did not run"
    assert at_checkpoint[0] < held / 4
    assert not wal.exists() or wal.stat().st_size < 1_000_000  # written into the file
    assert _one(client, "SELECT count(*) FROM enriched.big") == 300_001


def test_a_limit_the_checkpoint_cannot_set_back_fails_the_run(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The eviction before the CHECKPOINT is outside its best-effort catch: a memory_limit
    left at 1MB would fail the next load far from the cause, so it fails here."""
    client = store._client
    client.execute_sql("SET memory_limit = '1GB'")  # the user's
    execute = client.execute_sql

    def refusing_the_restore(sql: str, *args: object) -> object:
        if sql.startswith("SET memory_limit") and "1MB" not in sql:
            raise DatabaseTransientException(Exception("the restore failed"))
        return execute(sql, *args)

    monkeypatch.setattr(client, "execute_sql", refusing_the_restore)
    with pytest.raises(DatabaseTransientException, match="the restore failed"):
        store.checkpoint()
