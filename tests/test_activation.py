"""Socket activation: which inherited descriptors are served, and a twistd process started on one.

systemd (tftp-offload.socket) binds port 69 itself and execs the service with the socket as
descriptor 3, LISTEN_FDS=1 and LISTEN_PID set, still in blocking mode. The first tests are
`activation.py`'s own: in this process descriptors from 3 up belong to pytest and the reactor,
so they only probe (probing changes nothing) and check that our own socket is among the
answers; the exact numbering is checked in a child process that owns its descriptors. The
rest hand a real `twistd -n tftp-offload` a socket exactly as systemd does (a small launcher,
and systemd's own `systemd-socket-activate` where installed) and fetch from it with curl,
byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from tests.support.inherit import run_child
from tests.support.service_process import (
    DEBIAN_TWISTD,
    LAUNCHER,
    TWISTD_MAIN,
    Twistd,
    bound_socket,
    curl_fetch,
    environment,
    free_udp_port,
    servers,  # noqa: F401  (fixture)
    start_inherited,
)
from tftp_offload.activation import _as_executed, inherited_datagram_sockets


@pytest.fixture
def udp_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def test_inherited_meant_for_another_process(udp_socket: socket.socket) -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": str(udp_socket.fileno())}
    assert inherited_datagram_sockets(env) == []


@pytest.mark.parametrize("fds", ["", "two", "-1", "0"])
def test_inherited_no_or_bad_count(fds: str) -> None:
    assert inherited_datagram_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": fds}) == []


def test_inherited_nothing_passed() -> None:
    assert inherited_datagram_sockets({}) == []


def test_inherited_finds_a_udp_socket_and_leaves_it_open(udp_socket: socket.socket) -> None:
    fd = udp_socket.fileno()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(max(fd, tcp.fileno()) - 2)}
        found = inherited_datagram_sockets(env)
        assert (fd, socket.AF_INET) in found
        assert tcp.fileno() not in [f for f, _ in found]
        for other, family in found:  # whatever else this process holds: only UDP sockets
            probe = socket.socket(fileno=other)
            try:
                assert probe.type == socket.SOCK_DGRAM and probe.family == family
            finally:
                probe.detach()
        # Probing detached: the sockets are still open and usable.
        assert udp_socket.getsockname()[0] == "127.0.0.1"
        os.fstat(tcp.fileno())
    finally:
        tcp.close()


def test_inherited_clears_the_environment_it_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "tftp")
    assert inherited_datagram_sockets() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


def test_inherited_systemd_numbering_in_a_child_process() -> None:
    found, left = run_child("function")
    assert found == [[3, socket.AF_INET], [5, socket.AF_INET6]]
    assert left == []


def test_the_environment_as_executed(tmp_path: Path) -> None:
    """/proc/self/environ's format: NUL-separated NAME=VALUE; only the LISTEN_* variables are taken."""
    environ = tmp_path / "environ"
    environ.write_bytes(b"PATH=/usr/bin\0LISTEN_FDS=2\0LISTEN_PID=7\0LISTEN_FDNAMES=tftp:tftp6\0X=LISTEN_FDS=9\0")
    assert _as_executed(str(environ)) == {"LISTEN_FDS": "2", "LISTEN_PID": "7", "LISTEN_FDNAMES": "tftp:tftp6"}
    assert _as_executed(str(tmp_path / "missing")) == {}  # not Linux: nothing found


AFTER_REMOVAL = """
import json, os, socket
import twisted.internet.endpoints  # Twisted 23 and later: removes LISTEN_FDS and LISTEN_PID from os.environ
for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
    os.environ.pop(name, None)  # as it does, whichever Twisted this is
from tftp_offload.activation import inherited_datagram_sockets
print(json.dumps([inherited_datagram_sockets(), inherited_datagram_sockets()]))
"""


def test_sockets_are_found_once_after_something_removed_the_variables() -> None:
    """The variables were removed from os.environ before we looked (twistd importing
    twisted.internet.endpoints does that): the socket is still found, from the environment the
    process was executed with, and only by the first look (sd_listen_fds(unset=1) semantics)."""
    sock = bound_socket("127.0.0.1")
    try:
        done = subprocess.run([sys.executable, "-c", LAUNCHER, str(sock.fileno()), sys.executable, "-c",
                               AFTER_REMOVAL], pass_fds=(sock.fileno(),), env=environment(), check=False,
                              capture_output=True, text=True, timeout=30)
    finally:
        sock.close()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[[3, socket.AF_INET]], []]


FILES = {"boot.img": 3_000_000, "grub.cfg": 700}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("activation-root")
    for name, size in FILES.items():
        (path / name).write_bytes(os.urandom(size))
    return path


def fetch_all(host: str, port: int, root: Path, tmp_path: Path) -> None:
    for name in FILES:
        out = tmp_path / f"{name}.{host.replace(':', '_')}"
        curl_fetch(host, port, name, out, "--tftp-blksize", "1468")
        assert out.read_bytes() == (root / name).read_bytes(), f"{name} via {host} differs"
    out = tmp_path / "grub.cfg.plain"
    curl_fetch(host, port, "grub.cfg", out)  # curl's default: blksize 512
    assert out.read_bytes() == (root / "grub.cfg").read_bytes()


TWISTDS = [
    pytest.param("venv", id="twistd"),
    pytest.param(DEBIAN_TWISTD, id="debian-twistd3", marks=pytest.mark.skipif(
        not os.access(DEBIAN_TWISTD, os.X_OK), reason=f"{DEBIAN_TWISTD} (Debian's python3-twisted) not installed")),
]

# (address the socket is bound to, addresses the clients use)
BINDINGS: List[Tuple[str, Tuple[str, ...]]] = [
    ("127.0.0.1", ("127.0.0.1",)),
    ("::1", ("::1",)),
    # What `ListenDatagram=69` makes: one dual-stack wildcard socket. Replies must leave
    # from the address each request was sent to, learnt per datagram on the adopted socket.
    ("::", ("127.0.0.1", "::1")),
]


@pytest.mark.parametrize("twistd", TWISTDS)
@pytest.mark.parametrize(("bind", "clients"), BINDINGS, ids=["v4", "v6", "dual-stack-wildcard"])
def test_serves_on_inherited_socket(
    twistd: str, bind: str, clients: Tuple[str, ...], root: Path, tmp_path: Path, reactor_name: str,
    servers: List[Twistd],
) -> None:
    sock = bound_socket(bind)
    port = int(sock.getsockname()[1])
    server = start_inherited(sock, tmp_path, ["--root", str(root)], reactor_name, twistd)
    servers.append(server)
    server.wait_for_log("Serving TFTP on inherited")
    log = server.log()
    assert "Serving TFTP on " not in log.replace("Serving TFTP on inherited", ""), \
        "with an inherited socket and no --listen, it must not bind [::]:69 (or anything) itself"
    for host in clients:
        fetch_all(host, port, root, tmp_path)
    assert server.stop() < 5  # idle: no drain to wait for
    assert server.log().count("complete") >= 3 * len(clients)


def test_inherited_socket_after_twisted_took_the_variables(
    root: Path, tmp_path: Path, reactor_name: str, servers: List[Twistd]
) -> None:
    """twistd rebuilding its plugin cache imports twisted.internet.endpoints before our options
    are parsed, and that import removes LISTEN_FDS from the environment: the socket is still ours."""
    sock = bound_socket("127.0.0.1")
    port = int(sock.getsockname()[1])
    log_path = tmp_path / "twistd.log"
    main = "import twisted.internet.endpoints; " + TWISTD_MAIN
    cmd = [sys.executable, "-c", LAUNCHER, str(sock.fileno()), sys.executable, "-c", main,
           "-n", "--pidfile=", "--logfile", str(log_path), "--reactor", reactor_name,
           "tftp-offload", "--root", str(root)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=environment(), pass_fds=(sock.fileno(),),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock.close()
    server = Twistd(proc, log_path, port)
    servers.append(server)
    server.wait_for_log("Serving TFTP on inherited")
    fetch_all("127.0.0.1", port, root, tmp_path)
    server.stop()


def test_inherited_socket_and_listen(root: Path, tmp_path: Path, reactor_name: str, servers: List[Twistd]) -> None:
    """--listen adds its own sockets next to the inherited one: both serve."""
    sock = bound_socket("127.0.0.1")
    inherited_port = int(sock.getsockname()[1])
    own_port = free_udp_port()
    server = start_inherited(sock, tmp_path, ["--root", str(root), "--listen", f"127.0.0.1:{own_port}"],
                             reactor_name)
    servers.append(server)
    server.wait_for_log(f"Serving TFTP on 127.0.0.1:{own_port}")
    for port in (inherited_port, own_port):
        out = tmp_path / f"boot.{port}"
        curl_fetch("127.0.0.1", port, "boot.img", out, "--tftp-blksize", "1468")
        assert out.read_bytes() == (root / "boot.img").read_bytes()
    server.stop()


def test_listen_pid_for_another_process_is_ignored(root: Path, tmp_path: Path, servers: List[Twistd]) -> None:
    """LISTEN_* meant for another PID (e.g. a parent's) are not ours: bind --listen only."""
    port = free_udp_port()
    log_path = tmp_path / "twistd.log"
    env = dict(environment(), LISTEN_FDS="1", LISTEN_PID="1")
    cmd = [sys.executable, "-c", TWISTD_MAIN, "-n", "--pidfile=", "--logfile", str(log_path),
           "tftp-offload", "--root", str(root), "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Twistd(proc, log_path, port)
    servers.append(server)
    server.wait_for_log(f"Serving TFTP on 127.0.0.1:{port}")
    assert "inherited" not in server.log()
    out = tmp_path / "grub.cfg"
    curl_fetch("127.0.0.1", port, "grub.cfg", out)
    assert out.read_bytes() == (root / "grub.cfg").read_bytes()
    server.stop()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed")
def test_systemd_socket_activate(root: Path, tmp_path: Path, reactor_name: str, servers: List[Twistd]) -> None:
    """systemd's own tool binds the port and, on the first datagram, execs twistd on it.

    The first RRQ wakes it up and stays queued in the socket: the server reads it once
    started, so the very first transfer works too."""
    port = free_udp_port()
    log_path = tmp_path / "twistd.log"
    cmd = ["systemd-socket-activate", "--datagram", "-l", f"127.0.0.1:{port}",
           "-E", f"PYTHONPATH={environment()['PYTHONPATH']}",
           sys.executable, "-c", TWISTD_MAIN, "-n", "--pidfile=", "--logfile", str(log_path)]
    if reactor_name != "default":
        cmd += ["--reactor", reactor_name]
    cmd += ["tftp-offload", "--root", str(root)]
    with (tmp_path / "stdout").open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    server = Twistd(proc, log_path, port)  # it execs twistd: the same PID
    servers.append(server)
    stdout = tmp_path / "stdout"
    deadline = 100
    while "Listening on" not in stdout.read_text(errors="replace") and deadline:
        assert proc.poll() is None, stdout.read_text(errors="replace")
        deadline -= 1
        time.sleep(0.05)
    fetch_all("127.0.0.1", port, root, tmp_path)
    assert f"Serving TFTP on inherited 127.0.0.1:{port}" in server.log()
    server.stop()


def test_launcher_hands_over_a_blocking_socket() -> None:
    """The launcher leaves the socket blocking, as systemd does (the server must fix that)."""
    sock = bound_socket("127.0.0.1")
    try:
        assert sock.getblocking()
        probe = ("import os, socket; s = socket.socket(fileno=3); print(s.getblocking(), "
                 "os.environ['LISTEN_FDS'], os.environ['LISTEN_PID'] == str(os.getpid())); s.detach()")
        result = subprocess.run([sys.executable, "-c", LAUNCHER, str(sock.fileno()), sys.executable, "-c", probe],
                                pass_fds=(sock.fileno(),), check=False, capture_output=True, text=True,
                                timeout=30)
        assert result.stdout.split() == ["True", "1", "True"], result
    finally:
        sock.close()
