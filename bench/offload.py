#!/usr/bin/env python3
"""Small-file rate through the AMP offload backend next to the directory backend, in one run.

Starts, on loopback: tftp-offload --root DIR; the reference backend
(tftp-offload-backend) plus tftp-offload --socket; tftpd-hpa when installed.
Then runs the shared harness' load generator against each in turn, the same
way (1 KiB file, 50 in flight, blksize 1468 with tsize, every byte verified),
alternating servers for `--rounds` rounds, and prints one line per run and
the medians as ratios to the directory backend. Stops only what it started.

usage: bench/offload.py [--total 3000] [--rounds 3] [--file-size 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
TWISTD = [str(REPO / ".venv" / "bin" / "twistd"), "-n", "--pidfile="]
TFTPLOAD = REPO / "build" / "bench" / "tftpload"
UNLIMITED = ["--max-sessions-per-client", "0", "--max-requests-per-second-per-client", "0"]
"""The load generator is one client address: the per-client limits would measure themselves."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: List[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=str(log.parent),
                            start_new_session=True)


def wait_serving(port: int, name: str, timeout: float = 15.0) -> None:
    """Until an RRQ for the test file gets an answer (bounded)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        while time.monotonic() < deadline:
            s.sendto(b"\0\1" + name.encode() + b"\0octet\0", ("127.0.0.1", port))
            try:
                _data, addr = s.recvfrom(2048)
            except socket.timeout:
                continue
            s.sendto(b"\0\5\0\0stop\0", addr)  # end the probe's transfer at once
            return
    raise SystemExit(f"nothing answers on 127.0.0.1:{port}")


def run_load(port: int, root: Path, name: str, total: int, pid: int) -> Dict[str, float]:
    cmd = [str(TFTPLOAD), "-p", str(port), "-r", str(root), "-V", "-c", "50", "-n", str(total), "-f", name,
           "-b", "1468", "-t", "-q", "-P", str(pid), "--max-time", "120"]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=150)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["ok"] != total:
        print(f"  warning: {result['ok']} of {total} ok ({result.get('first_error')})", file=sys.stderr)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--file-size", type=int, default=1024)
    args = ap.parse_args()
    if not TFTPLOAD.exists():
        raise SystemExit("build/bench/tftpload is missing: run scripts/setup")

    work = Path(tempfile.mkdtemp(prefix="tftp-offload-bench-"))
    root = work / "root"
    root.mkdir()
    name = "config"
    (root / name).write_bytes(os.urandom(args.file_size))
    procs: Dict[str, subprocess.Popen] = {}
    ports: Dict[str, int] = {}
    try:
        ports["directory"] = free_port()
        procs["directory"] = start([*TWISTD, "tftp-offload", "--quiet", "--root", str(root), "--listen",
                                     f"127.0.0.1:{ports['directory']}", "--max-sessions", "2000", *UNLIMITED],
                                   work / "directory.log")
        sock = work / "backend.sock"
        procs["backend"] = start([*TWISTD, "tftp-offload-backend", "--socket", str(sock), "--root", str(root)],
                                 work / "backend.log")
        deadline = time.monotonic() + 15
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        ports["amp"] = free_port()
        procs["amp"] = start([*TWISTD, "tftp-offload", "--quiet", "--socket", str(sock), "--listen",
                               f"127.0.0.1:{ports['amp']}", "--max-sessions", "2000", *UNLIMITED], work / "amp.log")
        hpa: Optional[str] = shutil.which("in.tftpd")
        if hpa:
            ports["tftpd-hpa"] = free_port()
            procs["tftpd-hpa"] = start([hpa, "--foreground", "--secure", "--address",
                                        f"127.0.0.1:{ports['tftpd-hpa']}", "--user", "root", str(root)],
                                       work / "tftpd-hpa.log")
        for port in ports.values():
            wait_serving(port, name)

        rates: Dict[str, List[float]] = {server: [] for server in ports}
        cpu: Dict[str, List[float]] = {server: [] for server in ports}
        for round_ in range(1, args.rounds + 1):
            for server, port in ports.items():
                result = run_load(port, root, name, args.total, procs[server].pid)
                rates[server].append(result["transfers_per_s"])
                cpu[server].append(result["server_cpu_s"] / max(result["ok"], 1) * 1e6)
                print(f"round {round_} {server:10} {result['transfers_per_s']:9.0f} files/s  "
                      f"p99 {result['p99_s'] * 1e3:6.1f} ms  server CPU {cpu[server][-1]:6.0f} us/file  "
                      f"failed {result['failed']}")
        base = statistics.median(rates["directory"])
        print(f"\nmedians ({args.rounds} rounds of {args.total} x {args.file_size} B, 50 in flight, blksize 1468):")
        for server in ports:
            rate = statistics.median(rates[server])
            note = " (server CPU only: the backend process is not counted)" if server == "amp" else ""
            print(f"  {server:10} {rate:9.0f} files/s  {rate / base:5.2f} x directory  "
                  f"server CPU {statistics.median(cpu[server]):6.0f} us/file{note}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
