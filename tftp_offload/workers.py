"""`--workers N`: more processes serving the same listening addresses, for hosts with many cores.

Every worker binds each listening address itself with SO_REUSEPORT, and the
kernel hashes each client's (address, port) to one of those sockets, hence to
one worker: a ROM's retransmitted RRQ reaches the worker already serving it,
so the duplicate rules hold as in a single process. Each worker owns its
transfers end to end (transfer sockets, backend connection, drain).

The twistd process is worker 0 and the parent. It binds first (so a port 0
is resolved), then starts workers 1..N-1 (`python -m tftp_offload.workers`
with its own tftp-offload options and the addresses it got), puts their log
events into its own log (as `[worker N]`), and on stop sends each one SIGTERM
and waits until it has drained and exited.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

log = Logger(namespace="tftp_offload")

WORKER_ENV = "TFTP_OFFLOAD_WORKER"
"""Set (to the worker's number) in a worker's environment: it serves, and starts no workers."""
REACTOR_ENV = "TFTP_OFFLOAD_WORKER_REACTOR"
PR_SET_PDEATHSIG = 1


def without_listen(argv: Sequence[str]) -> List[str]:
    """The options less every --listen/-l (a worker is given the addresses the parent bound)."""
    out: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--listen", "-l"):
            skip = True
        elif not (arg.startswith("--listen=") or (arg.startswith("-l") and not arg.startswith("--"))):
            out.append(arg)
    return out


def listen_args(addresses: Sequence[Tuple[str, int]]) -> List[str]:
    args: List[str] = []
    for host, port in addresses:
        args += ["--listen", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    return args


class _Worker(ProcessProtocol):
    """One worker process: its log events (JSON lines on stdout) are published here."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.ended: Deferred = Deferred()
        self._buffer = b""
        self.stopping = False

    def outReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            self._publish(line)

    def _publish(self, line: bytes) -> None:
        try:
            event = eventFromJSON(line.decode("utf-8", "replace").strip("\x1e"))
        except ValueError:
            event = {"log_format": "{line}", "line": line.decode("utf-8", "replace"), "log_namespace": "tftp_offload",
                     "log_level": None}
        # Formatted again here from the fields (the flattened copy ignores format specs such as
        # {duration:.3f}); JSON made the addresses lists: tuples again, as the worker logged them.
        event.pop("log_flattened", None)
        for key, value in event.items():
            if isinstance(value, list) and not key.startswith("log_"):
                event[key] = tuple(value)
        event["log_system"] = f"worker {self.number}"
        event["worker"] = self.number
        globalLogPublisher(event)

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            log.warn("worker {worker}: {line}", worker=self.number, line=line)

    def processEnded(self, reason: Failure) -> None:
        if self._buffer:
            self._publish(self._buffer)
        code = getattr(reason.value, "exitCode", None)
        if not self.stopping:
            log.error("Worker {worker} exited unexpectedly (exit status {code}); the others serve its "
                      "clients from now on", worker=self.number, code=code)
        self.ended.callback(code)


class Workers(Service):
    """Starts workers 1..count-1 once the parent's TFTP service listens; stops them with it."""

    def __init__(self, count: int, argv: Sequence[str], tftp: Any, reactor: Any = None) -> None:
        self.count = count
        self.argv = list(argv)
        self.tftp = tftp
        self._reactor = reactor
        self.workers: List[Tuple[Any, _Worker]] = []

    def startService(self) -> None:
        super().startService()
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        args = without_listen(self.argv) + listen_args(self.tftp.addresses())
        env: Dict[str, str] = dict(os.environ)
        env[REACTOR_ENV] = "asyncio" if "asyncio" in type(reactor).__module__ else "default"
        for number in range(1, self.count):
            env[WORKER_ENV] = str(number)
            worker = _Worker(number)
            process = reactor.spawnProcess(worker, sys.executable, [sys.executable, "-m", "tftp_offload.workers",
                                                                    *args], env=dict(env))
            self.workers.append((process, worker))
        log.info("Started {count} more workers (--workers {total})", count=self.count - 1, total=self.count)

    def stopService(self) -> Optional[Deferred]:
        super().stopService()
        ended = []
        for process, worker in self.workers:
            if not worker.ended.called:
                worker.stopping = True
                with contextlib.suppress(Exception):  # already gone: processEnded is on its way
                    process.signalProcess("TERM")
                ended.append(worker.ended)
        self.workers = []
        return DeferredList(ended) if ended else None


def main(argv: Optional[Sequence[str]] = None) -> None:
    """A worker: serve with the options given, log JSON events to stdout, stop on SIGTERM."""
    if os.environ.get(REACTOR_ENV) == "asyncio":
        from twisted.internet import asyncioreactor

        asyncioreactor.install()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    from .tap import Options, makeService

    # Out of the terminal's process group (a Ctrl-C reaches the parent, which then stops us, once),
    # and told to stop should the parent die without doing so.
    os.setpgid(0, 0)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:
        return  # the parent is already gone
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout)], redirectStandardIO=False)
    options = Options()
    options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    top = makeService(options)
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
