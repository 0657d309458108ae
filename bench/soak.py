#!/usr/bin/env python3
"""Soak (not in CI): a storm of transfers for `--minutes`, with loss and backend restarts injected.

Everything runs inside a network namespace this script creates (`tfs-soak-PID`,
deleted at the end), so the loss rule touches nothing else on the machine:

- the AMP reference backend (`tftp-offload-backend`) and `tftp-offload --socket`
  on 127.0.0.1 inside the namespace;
- nftables in the namespace drops `--loss` percent of UDP datagrams on the
  input hook (real loss, both directions; `--no-loss` skips it);
- the shared load generator (build/bench/tftpload) fetches a mix of files in
  rounds, `--concurrency` in flight, every byte verified;
- every `--restart-every` seconds the backend is killed (SIGKILL, by PID) and
  started again: lookups during the gap fail, and the server must reconnect.

At the end it prints transfers completed and failed, and the server's RSS
and open descriptors at the start and the end, as one JSON line too.

usage: sudo bench/soak.py [--minutes 10] [--loss 1 | --no-loss] [--concurrency 50]
                          [--restart-every 60] [--reactor default|asyncio]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")
TFTPLOAD = REPO / "build" / "bench" / "tftpload"
TWISTD = [PYTHON, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
PORT = 6969
FILES = {"small.bin": 1024, "config.txt": 3000, "kernel.bin": 256 << 10, "initrd.bin": 1 << 20}


def netns(name: str, *cmd: str) -> List[str]:
    return ["ip", "netns", "exec", name, *cmd]


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def status(pid: int) -> Dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return {"rss_kib": fields["VmRSS"], "hwm_kib": fields["VmHWM"], "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ns = f"tfs-soak-{os.getpid()}"
        self.work = Path(tempfile.mkdtemp(prefix="tfs-soak-", dir="/tmp"))
        self.root = self.work / "root"
        self.socket = str(self.work / "backend.sock")
        self.backend: Optional[subprocess.Popen] = None
        self.server: Optional[subprocess.Popen] = None
        self.restarts = 0

    def reactor_args(self) -> List[str]:
        return [] if self.args.reactor == "default" else ["--reactor", self.args.reactor]

    def setup(self) -> None:
        self.root.mkdir()
        for name, size in FILES.items():
            (self.root / name).write_bytes(os.urandom(size))
        sh("ip", "netns", "add", self.ns)
        sh(*netns(self.ns, "ip", "link", "set", "lo", "up"))
        if not self.args.no_loss:
            sh(*netns(self.ns, "nft", "add", "table", "inet", "soak"))
            sh(*netns(self.ns, "nft", "add", "chain", "inet", "soak", "inp",
                      "{ type filter hook input priority 0; }"))
            sh(*netns(self.ns, "nft", "add", "rule", "inet", "soak", "inp", "meta", "l4proto", "udp",
                      "numgen", "random", "mod", "1000", "<", str(int(self.args.loss * 10)), "drop"))

    def start_backend(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        log = open(self.work / "backend.log", "ab")  # noqa: SIM115 (kept open for the process)
        self.backend = subprocess.Popen(
            netns(self.ns, *TWISTD, *self.reactor_args(), "--logfile", str(self.work / "backend.twistd.log"),
                  "tftp-offload-backend", "--socket", self.socket, "--root", str(self.root)),
            cwd=self.work, stdout=log, stderr=log, env=env())
        end = time.monotonic() + 15
        while not os.path.exists(self.socket):
            if time.monotonic() > end or self.backend.poll() is not None:
                raise SystemExit(f"backend did not start: see {self.work}/backend.twistd.log")
            time.sleep(0.05)

    def start_server(self) -> None:
        log = open(self.work / "server.out", "ab")  # noqa: SIM115
        self.server = subprocess.Popen(
            netns(self.ns, *TWISTD, *self.reactor_args(), "--logfile", str(self.work / "server.log"),
                  "tftp-offload", "--socket", self.socket, "--listen", f"127.0.0.1:{PORT}", "--quiet",
                  "--give-up", "10", "--max-sessions-per-client", "0",
                  "--max-requests-per-second-per-client", "0"),
            cwd=self.work, stdout=log, stderr=log, env=env())
        end = time.monotonic() + 15
        while "Serving TFTP on" not in read(self.work / "server.log"):
            if time.monotonic() > end or self.server.poll() is not None:
                raise SystemExit(f"server did not start: see {self.work}/server.log")
            time.sleep(0.05)

    def restart_backend(self) -> None:
        assert self.backend is not None
        os.kill(self.backend.pid, signal.SIGKILL)  # by PID: ours only
        self.backend.wait(10)
        self.restarts += 1
        self.start_backend()

    def load_round(self) -> Dict[str, int]:
        """One run of the load generator: 10 x `--concurrency` transfers, `--concurrency` at a time."""
        names = [arg for name in FILES for arg in ("-f", name)]
        cmd = netns(self.ns, str(TFTPLOAD), "-H", "127.0.0.1", "-p", str(PORT), "-r", str(self.root), "-V", "-q",
                    *names, "-c", str(self.args.concurrency), "-n", str(10 * self.args.concurrency),
                    "-b", "1468", "-w", "8", "-t", "--retries", "8", "--max-time", "300")
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=330)
        lines = proc.stdout.strip().splitlines()
        if not lines:
            return {"ok": 0, "failed": 0, "verify_fail": 0}
        stats = json.loads(lines[-1])
        return {key: int(stats.get(key, 0)) for key in ("ok", "failed", "verify_fail")}

    def run(self) -> Dict[str, object]:
        self.setup()
        self.start_backend()
        self.start_server()
        assert self.server is not None
        time.sleep(1)
        start = status(self.server.pid)
        began = time.monotonic()
        end = began + self.args.minutes * 60
        stop = threading.Event()

        def restarts() -> None:  # during the load, not between rounds
            while not stop.wait(self.args.restart_every):
                self.restart_backend()
                print(f"[{time.monotonic() - began:6.0f}s] backend killed and restarted", flush=True)

        restarter = threading.Thread(target=restarts, daemon=True)
        restarter.start()
        totals = {"ok": 0, "failed": 0, "verify_fail": 0}
        rounds = 0
        try:
            while time.monotonic() < end:
                got = self.load_round()
                rounds += 1
                for key in totals:
                    totals[key] += got[key]
                print(f"[{time.monotonic() - began:6.0f}s] round {rounds}: {got}; server {status(self.server.pid)}",
                      flush=True)
        finally:
            stop.set()
            restarter.join(30)
        time.sleep(12)  # --give-up 10: whatever was abandoned ends
        finish = status(self.server.pid)
        log = read(self.work / "server.log")
        return {"minutes": self.args.minutes, "loss_percent": 0 if self.args.no_loss else self.args.loss,
                "concurrency": self.args.concurrency, "backend_restarts": self.restarts,
                "completed": totals["ok"], "failed": totals["failed"], "corrupted": totals["verify_fail"],
                "server_start": start, "server_end": finish, "server_alive": self.server.poll() is None,
                "tracebacks": log.count("Traceback")}

    def cleanup(self) -> None:
        for proc in (self.server, self.backend):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        subprocess.run(["ip", "netns", "del", self.ns], check=False, capture_output=True)
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def env() -> Dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--loss", type=float, default=1.0, help="percent of UDP datagrams dropped (input hook)")
    parser.add_argument("--no-loss", action="store_true", help="inject no loss")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--restart-every", type=float, default=60, help="seconds between backend restarts")
    parser.add_argument("--reactor", default="default")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespace, nftables)", file=sys.stderr)
        return 2
    if not TFTPLOAD.exists():
        print(f"{TFTPLOAD} is missing: run scripts/setup", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))  # clean up on SIGTERM too
    soak = Soak(args)
    try:
        result = soak.run()
    finally:
        soak.cleanup()
    print(json.dumps(result))
    ok = result["server_alive"] and not result["tracebacks"] and not result["corrupted"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
