"""An operator's start-up mistakes, on a real twistd: one line on stderr naming option, value and remedy.

Each case runs `twistd [-n] tftp-offload ...` as a subprocess and checks what reaches the
terminal (stderr, stdout) and the exit status. Nothing is sent anywhere: the mistakes are
caught before the server listens. 192.0.2.1 (TEST-NET-1) is only bound, never sent to.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Sequence

import pytest
from twisted.python import usage

from tests.support.harness import REPO, TwistdServer, free_udp_port, twistd_command, wait_until_serving
from tftp_offload import __version__, startup
from tftp_offload.tap import Options

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
NO_BIND_CAPABILITY = ["setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service"]
NO_DAC_CAPABILITIES = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                       "--inh-caps=-dac_override,-dac_read_search"]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def twistd(tmp_path: Path, *args: str, daemon: bool = False,
           prefix: Sequence[str] = ()) -> "subprocess.CompletedProcess[str]":
    """Run twistd to its exit (a daemon that did start is stopped by the PID in its pidfile)."""
    pidfile = tmp_path / "twistd.pid"
    cmd = [*prefix, *TWISTD, *([] if daemon else ["-n"]), "--pidfile", str(pidfile),
           "--logfile", str(tmp_path / "twistd.log"), "tftp-offload", *args]
    try:
        return subprocess.run(cmd, cwd=tmp_path, env=env(), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60, check=False)
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)


def one_line(done: "subprocess.CompletedProcess[str]") -> str:
    """The failure as the operator sees it: exit status 1, one line on stderr, nothing else."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == "", done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and "Error" not in lines[0].split(":")[0]
    return lines[0]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    served = tmp_path / "root"
    served.mkdir()
    (served / "hello.txt").write_bytes(b"Hello from tftp-offload\n")
    return served


@pytest.mark.skipif(os.geteuid() != 0, reason="drops a capability from root with setpriv")
@pytest.mark.parametrize("daemon", [False, True], ids=["nodaemon", "daemon"])
def test_port_69_without_privilege(tmp_path: Path, root: Path, daemon: bool) -> None:
    line = one_line(twistd(tmp_path, "--root", str(root), "--listen", "127.0.0.1:69", daemon=daemon,
                           prefix=NO_BIND_CAPABILITY))
    assert line.startswith("tftp-offload: --listen 127.0.0.1:69: port 69 needs privilege"), line
    for remedy in ("root", "CAP_NET_BIND_SERVICE",
                   "setpriv --inh-caps=+net_bind_service --ambient-caps=+net_bind_service",
                   "AmbientCapabilities=CAP_NET_BIND_SERVICE", "systemd-socket-activate --datagram"):
        assert remedy in line, line


@pytest.mark.skipif(os.geteuid() != 0, reason="drops a capability from root with setpriv")
def test_default_listen_without_privilege(tmp_path: Path, root: Path) -> None:
    """No --listen means [::]:69: the same line, naming the default."""
    line = one_line(twistd(tmp_path, "--root", str(root), prefix=NO_BIND_CAPABILITY))
    assert line.startswith("tftp-offload: --listen [::]:69: port 69 needs privilege"), line


@pytest.mark.parametrize("daemon", [False, True], ids=["nodaemon", "daemon"])
def test_port_in_use(tmp_path: Path, root: Path, daemon: bool) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        line = one_line(twistd(tmp_path, "--root", str(root), "--listen", f"127.0.0.1:{port}", daemon=daemon))
    # The whole message, in daemon mode too (twistd's own report is cut at 100 bytes).
    assert line == (f"tftp-offload: --listen 127.0.0.1:{port}: UDP port {port} on 127.0.0.1 is already in use "
                    f"(another TFTP server? see ss -ulpn 'sport = :{port}'): stop it, or choose another --listen")


def test_address_not_on_this_host(tmp_path: Path, root: Path) -> None:
    line = one_line(twistd(tmp_path, "--root", str(root), "--listen", "192.0.2.1:16969"))
    assert line == ("tftp-offload: --listen 192.0.2.1:16969: 192.0.2.1 is not an address of this host "
                    "(see ip -brief address): give one of its addresses, or [::]:16969 for all of them")


@pytest.mark.parametrize("value,named", [("foo", "foo"), ("127.0.0.1", "127.0.0.1"), ("[::1]", "[::1]"),
                                         ("127.0.0.1:", "127.0.0.1")])
def test_listen_without_a_port(tmp_path: Path, root: Path, value: str, named: str) -> None:
    line = one_line(twistd(tmp_path, "--root", str(root), "--listen", value))
    assert f"--listen {value}: the port is missing: --listen {named}:69" in line, line


@pytest.mark.parametrize(
    "args,says",
    [
        (["--frob"], "option --frob not recognized"),
        (["--root", "{root}", "--protocol", "legacy"], "--protocol is for a --socket backend"),
        (["--root", "{root}", "--backend-timeout", "2"], "--backend-timeout is for a --socket backend"),
        (["--root", "{root}/missing"], "is not a directory"),
        (["--root", "{root}", "--log-format", "xml"], "--log-format must be text or json"),
        ([], "give exactly one of --root DIR"),
        (["--root", "{root}", "--timeout", "0"], "--timeout must be from 0.01 to 255.0, not 0.0"),
        (["--root", "{root}", "--max-window-bytes", "100"], "--max-window-bytes must be from 512 to 1073741824"),
        (["--root", "{root}", "--timeout", "5", "--give-up", "2"], "--give-up must be at least --timeout"),
        (["--root", "{root}", "--port-range", "6000:5000"], "--port-range 6000:5000: ports from 1 to 65535"),
    ],
    ids=["unknown-option", "root-with-legacy", "root-with-backend-timeout", "missing-root", "log-format", "neither",
         "timeout-range", "window-bytes-range", "give-up-below-timeout", "port-range-order"],
)
def test_usage_errors_are_one_line_without_the_option_list(tmp_path: Path, root: Path, args: List[str],
                                                          says: str) -> None:
    line = one_line(twistd(tmp_path, *[arg.replace("{root}", str(root)) for arg in args]))
    assert line.startswith("tftp-offload: ") and says in line, line
    assert line.endswith("(twistd tftp-offload --help lists the options)")


def test_version(tmp_path: Path) -> None:
    done = subprocess.run([*TWISTD, "tftp-offload", "--version"], cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"tftp-offload {__version__} (Twisted "), done.stdout


@contextlib.contextmanager
def running(tmp_path: Path, args: Sequence[str], hosts: Sequence[str], port: int, root: Path,
            prefix: Sequence[str] = ()) -> Iterator[TwistdServer]:
    log_path = tmp_path / "twistd.log"
    cmd = [*prefix, *twistd_command(args, log_path, tmp_path / "twistd.pid")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    server = TwistdServer(list(hosts), port, root, log_path, proc, cmd)
    try:
        yield server
    finally:
        server.stop()


def test_listen_on_a_host_name_serves_each_of_its_addresses(tmp_path: Path, root: Path) -> None:
    """`--listen localhost:PORT` (resolved from /etc/hosts: no query leaves the host)."""
    addresses = sorted({info[4][0] for info in socket.getaddrinfo("localhost", 0, 0, socket.SOCK_DGRAM)})
    port = free_udp_port(tuple(addresses))
    with running(tmp_path, ["--root", str(root), "--listen", f"localhost:{port}"], addresses, port, root) as server:
        wait_until_serving(server)
        log = server.log()
        for host in addresses:
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            assert f"Serving TFTP on {shown}: files from {root} (directory)" in log, log
        server.assert_healthy()


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a folder root cannot read by dropping capabilities")
def test_unreadable_root_warns_at_start(tmp_path: Path) -> None:
    root = tmp_path / "private"
    root.mkdir(mode=0o700)
    os.chown(root, 12345, 12345)  # someone else's, mode 0700: the server (root without DAC override) cannot list it
    (root / "hello.txt").write_bytes(b"Hello from tftp-offload\n")
    port = free_udp_port(("127.0.0.1",))
    with running(tmp_path, ["--root", str(root), "--listen", f"127.0.0.1:{port}"], ["127.0.0.1"], port, root,
                 prefix=NO_DAC_CAPABILITIES) as server:
        end = time.monotonic() + 15
        while "cannot list it" not in server.log() and time.monotonic() < end and server.alive():
            time.sleep(0.05)
        log = server.log()
    assert (f"[tftp_offload#warn] --root {root}: user root (uid 0) cannot list it (Permission denied): every "
            f"request will be refused") in log, log


def test_readable_root_gives_no_warning(tmp_path: Path, root: Path) -> None:
    port = free_udp_port(("127.0.0.1",))
    with running(tmp_path, ["--root", str(root), "--listen", f"127.0.0.1:{port}"], ["127.0.0.1"], port, root) as server:
        wait_until_serving(server)
        assert "#warn" not in server.log(), server.log()


# ------------------------------------------------------------------ in-process checks --


def test_unresolvable_host_name_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked without a real lookup: a DNS query would leave the host."""
    def fail(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(startup.StartupError) as caught:
        startup.resolve("tftp.example:69", "tftp.example", 69)
    assert str(caught.value) == ("--listen tftp.example:69: cannot resolve the host name 'tftp.example' (Name or "
                                 "service not known): give an IP address, e.g. --listen 127.0.0.1:69 or "
                                 "--listen [::]:69 for all")


def test_listen_given_twice_is_refused(tmp_path: Path) -> None:
    port = free_udp_port(("127.0.0.1",))
    with pytest.raises(usage.UsageError, match="given twice"):
        Options().parseOptions(["--root", str(tmp_path), "--listen", f"127.0.0.1:{port}",
                                "--listen", f"127.0.0.1:{port}"])


@pytest.mark.skipif(os.geteuid() != 0, reason="makes files root cannot read by dropping capabilities")
def test_unreadable_files_in_root_warn_at_start(tmp_path: Path) -> None:
    root = tmp_path / "served"
    root.mkdir()
    root.chmod(0o755)
    (root / "hello.txt").write_bytes(b"Hello from tftp-offload\n")
    secret = root / "pxelinux.0"
    secret.write_bytes(b"x")
    secret.chmod(0o600)
    os.chown(secret, 12345, 12345)
    port = free_udp_port(("127.0.0.1",))
    with running(tmp_path, ["--root", str(root), "--listen", f"127.0.0.1:{port}"], ["127.0.0.1"], port, root,
                 prefix=NO_DAC_CAPABILITIES) as server:
        wait_until_serving(server)
        log = server.log()
    assert (f"[tftp_offload#warn] --root {root}: user root (uid 0) cannot read 1 of its first 2 entries "
            f"(e.g. pxelinux.0): requests for them will be refused") in log, log
