"""``apione-dlt``: the connector's command line, configured exactly like the pipeline.

Every setting comes from dlt's config (``.dlt/config.toml``, ``.dlt/secrets.toml``, env
vars ``SOURCES__APIONE__*``, ``DESTINATION__*``); the pipeline is named and placed as
``pipelines/enrich.py`` does it (``PIPELINE_NAME``, ``DESTINATION``, ``DATASET``).

    apione-dlt plan             what the next run would read, reject, send and bill
    apione-dlt plan --json      the same, as JSON
    apione-dlt status           jobs in flight (and when their results expire), last runs,
                                records billed per day
    apione-dlt webhooks serve   receive ApiOne's signed deliveries (pip extra `webhooks`)
    apione-dlt demo --help      the demo (as pipelines/demo.py, in the current directory)
    apione-dlt sandbox --help   the local ApiOne stand-in (same as apione-sandbox)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence


def _add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pipeline-name",
        default=os.environ.get("PIPELINE_NAME", "apione_enrichment"),
        help="dlt pipeline name (env PIPELINE_NAME; default apione_enrichment)",
    )
    parser.add_argument(
        "--destination",
        default=os.environ.get("DESTINATION", "duckdb"),
        help="dlt destination (env DESTINATION; default duckdb)",
    )
    parser.add_argument(
        "--dataset",
        default=os.environ.get("DATASET", "enriched"),
        help="dataset the results load into (env DATASET; default enriched)",
    )
    parser.add_argument(
        "--pipelines-dir", help="dlt pipelines dir to use (default: a temporary one)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``apione-dlt`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="apione-dlt",
        description="apione-dlt: the connector's command line, configured like the pipeline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    plan = commands.add_parser(
        "plan",
        help="dry run: what the next run would send and bill (sends nothing)",
        description=(
            "Read the input exactly as a run would and print rows read, rejected by reason, "
            "already fresh, to send, jobs, credits and the shortest wall time under the "
            "plan's limits. Calls no ApiOne endpoint, loads nothing, changes no state."
        ),
    )
    _add_pipeline_args(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    status = commands.add_parser(
        "status",
        help="jobs in flight, when their results expire, last runs, records billed per day",
        description=(
            "Read the job journal, run summaries and job ledger in the destination and ask "
            "ApiOne how each job in flight is doing (when reachable). Writes nothing."
        ),
    )
    _add_pipeline_args(status)
    status.add_argument("--offline", action="store_true", help="do not ask ApiOne")
    webhooks = commands.add_parser("webhooks", help="the webhook receiver")
    serve = webhooks.add_subparsers(dest="action", required=True, metavar="action").add_parser(
        "serve",
        help="receive ApiOne's signed deliveries and keep them for the next run",
        description=(
            "Serve POST /webhooks/apione and GET /health. The secret is "
            "sources.apione.webhook_secret (env SOURCES__APIONE__WEBHOOK_SECRET), the store "
            "sources.apione.webhook_store (a path or fsspec URL the runs read too)."
        ),
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface (0.0.0.0 in a container)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--store", help="overrides sources.apione.webhook_store")
    commands.add_parser(
        "demo", add_help=False, help="the demo: sandbox -> DuckDB in ./demo_data (--help)"
    )
    commands.add_parser(
        "sandbox", add_help=False, help="run the local ApiOne stand-in (apione-sandbox)"
    )
    return parser


def _serve(args: argparse.Namespace) -> int:
    import dlt
    import uvicorn

    from apione_source.deliveries import DeliveryStore
    from apione_source.receiver import create_app
    from apione_source.secret import Secret

    secret: str | None = dlt.secrets.get("sources.apione.webhook_secret")
    store = args.store or dlt.config.get("sources.apione.webhook_store")
    if not secret or not store:
        print(
            "apione-dlt webhooks serve: set sources.apione.webhook_secret and "
            "sources.apione.webhook_store (env SOURCES__APIONE__WEBHOOK_SECRET, "
            "SOURCES__APIONE__WEBHOOK_STORE) or --store",
            file=sys.stderr,
        )
        return 2
    app = create_app(DeliveryStore(str(store)), Secret(str(secret)))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _run(args: argparse.Namespace) -> int:
    import dlt

    from apione_source.errors import ApiOneError
    from apione_source.plan import plan_run
    from apione_source.source import apione
    from apione_source.status import pipeline_status

    # Not the real pipelines dir: creating the pipeline there would rewrite its local
    # state. Both commands only read the destination.
    workdir = tempfile.TemporaryDirectory(prefix="apione_cli_")
    pipeline = dlt.pipeline(
        pipeline_name=args.pipeline_name,
        destination=args.destination,
        dataset_name=args.dataset,
        pipelines_dir=args.pipelines_dir or workdir.name,
    )
    try:
        source = apione()
        if args.command == "plan":
            plan = plan_run(pipeline, source)
            print(json.dumps(plan.summary(), indent=2) if args.json else plan.text())
        else:
            (handle,) = [getattr(r, "apione_run") for r in source.resources.values()]  # noqa: B009
            connect = None if args.offline else handle.connect
            print(pipeline_status(pipeline, handle.settings, connect).text())
    except ApiOneError as exc:
        print(f"apione-dlt {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        workdir.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``apione-dlt`` command; its exit status (2: a configuration problem)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from apione_source.demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["sandbox"]:
        from apione_source.sandbox.__main__ import main as sandbox_main

        return sandbox_main(argv[1:])
    args = build_parser().parse_args(argv)
    return _serve(args) if args.command == "webhooks" else _run(args)


if __name__ == "__main__":
    sys.exit(main())
