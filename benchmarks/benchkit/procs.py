"""Child processes: run one and measure it, or keep the sandbox running beside the others."""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

#: The interpreter of the uv environment the harness runs in (no ``uv run`` per child:
#: uv would be the measured process and its start-up would count).
PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk_test_bench"

# dlt settings the harness's own environment must not leak into a measured child.
_DLT_ENV_PREFIXES = (
    "SOURCES__",
    "DESTINATION__",
    "NORMALIZE__",
    "LOAD__",
    "EXTRACT__",
    "DATA_WRITER__",
    "RUNTIME__",
    "DLT_",
)
_DLT_ENV_NAMES = ("PIPELINE_NAME", "DESTINATION", "DATASET")


@dataclass(frozen=True)
class ChildRun:
    """How one child process went: wall time, CPU time, peak RSS and exit status."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    returncode: int
    log: Path

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the child's output (for error messages)."""
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def child_env(workdir: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """Environment of a measured child: no inherited dlt settings, dlt dirs in ``workdir``.

    ``DLT_PROJECT_DIR`` points at ``workdir`` (no ``.dlt/`` there), so the repository's
    ``.dlt/config.toml`` cannot change what is measured; ``DLT_DATA_DIR`` keeps the
    pipelines dir (state, load packages) inside the benchmark's temp dir.

    Args:
        workdir: The run's directory.
        extra: Settings for this child.

    Returns:
        The environment.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_DLT_ENV_PREFIXES) and k not in _DLT_ENV_NAMES
    }
    env.update(
        {
            "RUNTIME__DLTHUB_TELEMETRY": "false",
            "RUNTIME__LOG_LEVEL": "WARNING",
            "DLT_PROJECT_DIR": str(workdir),
            "DLT_DATA_DIR": str(workdir / "dlt_data"),
            "PYTHONPATH": str(REPO),
        }
    )
    env.update(extra)
    return env


def _vm_hwm_kib(pid: int) -> int:
    """The peak resident set of a running process (KiB), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_child(
    cmd: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path, timeout_s: float
) -> ChildRun:
    """Run ``cmd`` to completion and measure it (``os.wait4``, ``/proc/<pid>/status``).

    Peak memory is the child's own high-water mark (``VmHWM``), sampled every 20 ms
    until it exits: Linux carries the *parent's* peak into a child's ``ru_maxrss`` across
    fork and exec, so ``ru_maxrss`` would report at least what this harness held (a
    million domains, say) when it started the child. Output goes to ``log``.

    Args:
        cmd: The command.
        env: Its environment.
        cwd: Its working directory.
        log: File receiving its stdout and stderr.
        timeout_s: Killed (SIGKILL) after this many seconds.

    Returns:
        The measurements.
    """
    with log.open("wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT
        )
        watchdog = threading.Timer(timeout_s, proc.kill)
        watchdog.start()
        peak_kib = 0
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                peak_kib = max(peak_kib, _vm_hwm_kib(proc.pid))
                time.sleep(0.02)
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
    return ChildRun(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=(peak_kib or usage.ru_maxrss) / 1024.0,
        returncode=proc.returncode,
        log=log,
    )


@dataclass(frozen=True)
class SandboxSpec:
    """Knobs of one sandbox process (the CLI's flags)."""

    plan: str
    job_seconds_base: float = 0.0
    job_seconds_per_record: float = 0.0
    queue_seconds: float = 0.0
    time_scale: float = 1.0
    estimate_factor: float | None = None

    def job_seconds(self, records: int) -> float:
        """How long a job of ``records`` records takes, queue included (seconds)."""
        work = self.job_seconds_base + self.job_seconds_per_record * records
        return (self.queue_seconds + work) * self.time_scale

    def flags(self) -> list[str]:
        """The CLI flags for this spec."""
        out = [
            "--plan",
            self.plan,
            "--job-seconds-base",
            str(self.job_seconds_base),
            "--job-seconds-per-record",
            str(self.job_seconds_per_record),
            "--queue-seconds",
            str(self.queue_seconds),
            "--time-scale",
            str(self.time_scale),
        ]
        if self.estimate_factor is not None:
            out += ["--estimate-factor", str(self.estimate_factor)]
        return out


class SandboxProcess:
    """The ApiOne sandbox as a separate process, as ApiOne would be.

    Started with ``--port 0``; the first line it prints is its base URL. Use as a
    context manager; :attr:`cpu_s` and :attr:`peak_rss_mb` are known after exit.

    Args:
        spec: Its knobs.
        log: File receiving its stderr.
    """

    def __init__(self, spec: SandboxSpec, log: Path) -> None:
        self.spec = spec
        self.log = log
        self.base_url = ""
        self.cpu_s = 0.0
        self.peak_rss_mb = 0.0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def root_url(self) -> str:
        """``http://host:port``, where ``/_sandbox/usage`` lives."""
        return self.base_url.removesuffix("/api/v1")

    def __enter__(self) -> SandboxProcess:
        env = {**os.environ, "APIONE_SANDBOX_API_KEY": API_KEY, "PYTHONPATH": str(REPO)}
        cmd = [PYTHON, "-m", "apione_source.sandbox", "--port", "0", *self.spec.flags()]
        with self.log.open("wb") as err:
            self._proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err)
        self.base_url = self._first_line(self._proc, timeout_s=60.0)
        return self

    def _first_line(self, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
        """The base URL the sandbox prints first; RuntimeError with its stderr if none."""
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        line = proc.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("http"):
            proc.kill()
            proc.wait()
            proc.stdout.close()
            err = self.log.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"the sandbox did not start: {' | '.join(err) or line!r}")
        return line

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc = self._proc
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        killer = threading.Timer(15.0, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.stdout is not None:
            proc.stdout.close()
        self.cpu_s = usage.ru_utime + usage.ru_stime
        self.peak_rss_mb = usage.ru_maxrss / 1024.0

    def usage(self) -> dict[str, Any]:
        """``GET /_sandbox/usage``: jobs, billing and call counters."""
        reply = httpx.get(f"{self.root_url}/_sandbox/usage", timeout=120.0)
        reply.raise_for_status()
        body: dict[str, Any] = reply.json()
        return body


WEBHOOK_SECRET = "whsec_sandbox"  # what the sandbox signs with by default


class ReceiverProcess:
    """``apione-dlt webhooks serve`` as a separate process, storing into ``store``.

    Use as a context manager; :attr:`url` is where ApiOne (the sandbox) delivers.
    """

    def __init__(self, store: Path, log: Path) -> None:
        self.store, self.log = store, log
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ReceiverProcess:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "SOURCES__APIONE__WEBHOOK_SECRET": WEBHOOK_SECRET,
            "RUNTIME__DLTHUB_TELEMETRY": "false",
        }
        cmd = [PYTHON, "-m", "apione_source.cli", "webhooks", "serve", "--port", str(port)]
        cmd += ["--store", str(self.store)]
        with self.log.open("wb") as out:
            self._proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, cwd=self.log.parent)
        root = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{root}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self._proc.poll() is not None:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the receiver did not start: {self.log.read_text()[-500:]}")
            time.sleep(0.1)
        self.url = f"{root}/webhooks/apione"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def sandbox_supports(flag: str) -> bool:
    """Whether the sandbox CLI has ``flag`` (e.g. ``--estimate-factor``, being added)."""
    out = subprocess.run(
        [PYTHON, "-m", "apione_source.sandbox", "--help"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return flag in out.stdout


def _machine_busy_s() -> float | None:
    """CPU-seconds every CPU of the machine spent busy since boot (Linux ``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU-seconds of this process and of every child it has waited for."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class ForeignCpu:
    """How much CPU other processes (not the benchmark's) used while it ran.

    On a 2-core machine a test suite running beside the benchmark changes every figure;
    this makes that visible instead of silently slower numbers.
    """

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = _machine_busy_s()
        self._own0 = _own_cpu_s()

    def share(self) -> float | None:
        """Foreign CPU-seconds as a share of the machine's capacity since start (0..1)."""
        busy1 = _machine_busy_s()
        if busy1 is None or self._busy0 is None:
            return None
        foreign = (busy1 - self._busy0) - (_own_cpu_s() - self._own0)
        capacity = (time.monotonic() - self._t0) * (os.cpu_count() or 1)
        return max(0.0, foreign / capacity) if capacity > 0 else None
