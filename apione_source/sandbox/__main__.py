"""Command line: run the sandbox until SIGINT or SIGTERM.

``apione-sandbox --port 8765 --plan free --job-seconds-per-record 0.01`` or
``python -m apione_source.sandbox ...``. The first line printed is the base URL, so a
parent process can read it (with ``--port 0`` the port is only known then).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from apione_source.errors import ConfigurationError
from apione_source.sandbox.engine import JOB_ID_STYLES
from apione_source.sandbox.server import Sandbox
from apione_source.settings import PLANS

API_KEY_ENV = "APIONE_SANDBOX_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser; every Sandbox knob is a flag.

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(
        prog="apione-sandbox", description="Local stand-in for ApiOne's async enrichment API."
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    p.add_argument("--plan", default="growth", choices=sorted(PLANS), help="plan limits")
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV, "sk_test_sandbox"),
        help=f"the accepted API key (default ${API_KEY_ENV} or sk_test_sandbox)",
    )
    p.add_argument("--job-seconds-base", type=float, default=0.0)
    p.add_argument("--job-seconds-per-record", type=float, default=0.0)
    p.add_argument("--queue-seconds", type=float, default=0.0)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument(
        "--estimate-factor",
        type=float,
        default=1.0,
        help="multiplies the estimated_completion_seconds answered (1/3: 3x too low)",
    )
    p.add_argument("--failure-rate", type=float, default=0.0, help="share of jobs that fail")
    p.add_argument(
        "--transient-error-rate", type=float, default=0.0, help="share of 500/503/429 answers"
    )
    p.add_argument("--retry-after-seconds", type=int, default=1)
    p.add_argument("--latency-seconds", type=float, default=0.0)
    p.add_argument(
        "--retention-seconds", type=float, default=None, help="default: the plan's retention"
    )
    p.add_argument("--record-error-rate", type=float, default=0.0)
    drift = p.add_argument_group(
        "contract drift", "each rate is a share of jobs, drawn reproducibly from --seed"
    )
    drift.add_argument(
        "--short-results-rate", type=float, default=0.0, help="results lack their last record"
    )
    drift.add_argument(
        "--bad-index-rate", type=float, default=0.0, help="one result has a wrong index"
    )
    drift.add_argument(
        "--wrong-echo-rate", type=float, default=0.0, help="one result echoes another input"
    )
    drift.add_argument(
        "--status-404-first-rate",
        type=float,
        default=0.0,
        help="the first status call answers 404 job_not_found",
    )
    drift.add_argument(
        "--unknown-status-rate",
        type=float,
        default=0.0,
        help='the first --unknown-status-calls status answers say "paused"',
    )
    drift.add_argument("--unknown-status-calls", type=int, default=2)
    drift.add_argument(
        "--job-id-style",
        default="default",
        choices=JOB_ID_STYLES,
        help="odd: ids with '-', '.', ':', '/', ' ', '+', '%%' needing URL encoding",
    )
    drift.add_argument(
        "--submit-answer-delay-seconds",
        type=float,
        default=0.0,
        help="answer a submit this late, after its job is created and billed",
    )
    p.add_argument(
        "--request-timeout-seconds",
        type=float,
        default=30.0,
        help="socket timeout freeing a stalled connection; 0 waits forever (default 30)",
    )
    p.add_argument("--webhook-secret", default="whsec_sandbox")
    p.add_argument("--webhook-retry-base-seconds", type=float, default=1.0)
    p.add_argument(
        "--webhook-repeats",
        type=int,
        default=0,
        help="send each accepted delivery this many more times (same delivery id)",
    )
    p.add_argument(
        "--webhook-jitter-seconds",
        type=float,
        default=0.0,
        help="wait a random 0..this before each delivery (out-of-order arrival)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def sandbox_from_args(args: argparse.Namespace) -> Sandbox:
    """Build the (unstarted) sandbox the parsed flags describe.

    Args:
        args: What :func:`build_parser` parsed.

    Returns:
        The sandbox.

    Raises:
        ConfigurationError: A flag value the sandbox refuses.
    """
    return Sandbox(
        plan=args.plan,
        api_key=args.api_key,
        host=args.host,
        port=args.port,
        job_seconds_base=args.job_seconds_base,
        job_seconds_per_record=args.job_seconds_per_record,
        queue_seconds=args.queue_seconds,
        time_scale=args.time_scale,
        estimate_factor=args.estimate_factor,
        failure_rate=args.failure_rate,
        transient_error_rate=args.transient_error_rate,
        retry_after_seconds=args.retry_after_seconds,
        latency_seconds=args.latency_seconds,
        retention_seconds=args.retention_seconds,
        record_error_rate=args.record_error_rate,
        short_results_rate=args.short_results_rate,
        bad_index_rate=args.bad_index_rate,
        wrong_echo_rate=args.wrong_echo_rate,
        status_404_first_rate=args.status_404_first_rate,
        unknown_status_rate=args.unknown_status_rate,
        unknown_status_calls=args.unknown_status_calls,
        job_id_style=args.job_id_style,
        submit_answer_delay_seconds=args.submit_answer_delay_seconds,
        request_timeout_seconds=args.request_timeout_seconds or None,
        webhook_secret=args.webhook_secret,
        webhook_retry_base_seconds=args.webhook_retry_base_seconds,
        webhook_repeats=args.webhook_repeats,
        webhook_jitter_seconds=args.webhook_jitter_seconds,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sandbox until SIGINT or SIGTERM.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        The exit status: 0 after a clean stop, 2 on a bad configuration.
    """
    args = build_parser().parse_args(argv)
    try:
        sandbox = sandbox_from_args(args)
    except ConfigurationError as exc:
        print(f"apione-sandbox: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    sandbox.start()
    try:
        print(sandbox.base_url, flush=True)
        print(
            f"apione-sandbox: plan {args.plan}, usage at {sandbox.root_url}/_sandbox/usage",
            file=sys.stderr,
            flush=True,
        )
        # Event.wait without a timeout would defer signal handling on some platforms.
        while not stop.wait(0.5):
            pass
    finally:
        sandbox.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
