"""IPv6 link-local, as UEFI PXE clients use it: a real twistd in one network namespace, real
clients (curl, tftp-hpa, a probe of our own) in another, joined by a veth pair.

Checked: the server answers on `[fe80::1%IF]:PORT` and on `[::]:PORT`; every reply (DATA from
the transfer port, ERROR from the listening port) leaves from fe80::1 on that link; the backend
sees the local address as `fe80::1%IF` (an interface name, not an index): the per-client
directory named after it is what the client gets. --root-per-client mac finds the client's MAC
in the server's neighbour table, over IPv4 and link-local IPv6. Traffic stays inside the namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from tests.support.harness import REPO, twistd_command
from tftp_offload.udp import bind_address

SERVER_ADDR = "fe80::1"
CLIENT_ADDR = "fe80::2"
SERVER_V4 = "192.0.2.1"  # documentation addresses, only inside the test's namespaces
CLIENT_V4 = "192.0.2.2"
SERVER_MAC = "02:00:00:00:00:01"
CLIENT_MAC = "02:00:00:00:00:02"
MAC_PORT = 6971
PORT = 6969  # the namespaces are ours: no other process can hold these ports
WILDCARD_PORT = 6970
HELLO = b"Hello over a link-local address\n"
BIG = os.urandom(200_000)

PROBE = r"""
import json, socket, struct, sys
host, scope, port, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
ifindex = socket.if_nametoindex(scope)
sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sock.bind(("fe80::2", 0, 0, ifindex))
sock.settimeout(5)
sock.sendto(b"\0\1" + name + b"\0octet\0blksize\0" + b"65464\0", (host, port, 0, ifindex))
sources, data, done = [], b"", False
while not done:
    packet, addr = sock.recvfrom(70000)
    sources.append([addr[0], socket.if_indextoname(addr[3]), addr[1] != port])
    opcode, block = struct.unpack("!HH", packet[:4])
    if opcode == 6:  # OACK
        options = packet[2:].split(b"\0")
        blksize = int(options[options.index(b"blksize") + 1])
        sock.sendto(struct.pack("!HH", 4, 0), addr)
    elif opcode == 3:
        data += packet[4:]
        sock.sendto(struct.pack("!HH", 4, block), addr)
        done = len(packet) - 4 < blksize
    else:
        print(json.dumps({"error": packet[4:-1].decode(), "sources": sources}))
        sys.exit(0)
print(json.dumps({"size": len(data), "blksize": blksize, "sources": sources}))
"""


class Link:
    """Two namespaces joined by a veth pair, each end with a fixed link-local address (no DAD)."""

    def __init__(self) -> None:
        tag = f"tff{os.getpid()}"
        self.server_ns, self.client_ns = f"{tag}s", f"{tag}c"
        self.server_if, self.client_if = f"{tag}s", f"{tag}c"  # at most 15 characters

    def run(self, *args: str, ns: str = "") -> None:
        cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)

    def create(self) -> None:
        for ns in (self.server_ns, self.client_ns):
            self.run("ip", "netns", "add", ns)
            self.run("ip", "link", "set", "lo", "up", ns=ns)
        self.run("ip", "link", "add", self.server_if, "netns", self.server_ns,
                 "type", "veth", "peer", "name", self.client_if, "netns", self.client_ns)
        for ns, name, address, v4, mac in (
                (self.server_ns, self.server_if, SERVER_ADDR, SERVER_V4, SERVER_MAC),
                (self.client_ns, self.client_if, CLIENT_ADDR, CLIENT_V4, CLIENT_MAC)):
            # No address of the kernel's making (and no DAD): only the ones the test names.
            self.run("ip", "link", "set", name, "address", mac, "addrgenmode", "none", ns=ns)
            self.run("ip", "addr", "add", f"{address}/64", "dev", name, "nodad", ns=ns)
            self.run("ip", "addr", "add", f"{v4}/24", "dev", name, ns=ns)
            self.run("ip", "link", "set", name, "up", ns=ns)

    def delete(self) -> None:
        for ns in (self.server_ns, self.client_ns):  # deleting a namespace deletes its veth end
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=30)

    def client(self, *args: str, timeout: float = 60) -> "subprocess.CompletedProcess[str]":
        return subprocess.run(["ip", "netns", "exec", self.client_ns, *args], check=False,
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def link() -> Iterator[Link]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for network namespaces")
    made = Link()
    try:
        made.create()
        yield made
    finally:
        made.delete()


@pytest.fixture(scope="module")
def served(link: Link, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Path]:
    """twistd in the server namespace on [fe80::1%IF]:6969 and [::]:6970, serving a root with a
    directory for the client named by its address and the server's interface."""
    root = tmp_path_factory.mktemp("root")
    (root / "hello.txt").write_bytes(HELLO)
    (root / "big.bin").write_bytes(BIG)
    (root / "who.txt").write_bytes(b"everyone\n")
    (root / f"{CLIENT_ADDR}%{link.server_if}").mkdir()
    (root / f"{CLIENT_ADDR}%{link.server_if}" / "who.txt").write_bytes(b"fe80::2 on the server's link\n")
    args = ["--root", str(root), "--root-per-client", "ip",
            "--listen", f"[{SERVER_ADDR}%{link.server_if}]:{PORT}", "--listen", f"[::]:{WILDCARD_PORT}"]
    with twistd_in(link, args, tmp_path_factory, request, listeners=2) as log_path:
        yield root
    assert f"Serving TFTP on [{SERVER_ADDR}%{link.server_if}]:{PORT}" in log_path.read_text()


@contextlib.contextmanager
def twistd_in(link: Link, args: List[str], tmp_path_factory: pytest.TempPathFactory,
              request: pytest.FixtureRequest, listeners: int) -> Iterator[Path]:
    """A twistd running `args` in the server namespace until the block ends; yields its log's path."""
    workdir = tmp_path_factory.mktemp("twistd")
    log_path = workdir / "twistd.log"
    reactor = str(request.config.getoption("reactor", "default"))
    cmd = ["ip", "netns", "exec", link.server_ns, *twistd_command(args, log_path, workdir / "pid", reactor)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with (workdir / "stdout").open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        end = time.monotonic() + 20
        while not log_path.exists() or log_path.read_text().count("Serving TFTP on") < listeners:
            assert proc.poll() is None, (workdir / "stdout").read_text()
            assert time.monotonic() < end, "twistd did not start listening"
            time.sleep(0.05)
        yield log_path
    finally:
        if proc.poll() is None:
            proc.terminate()  # our own process, by its PID
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    log = log_path.read_text()
    assert "Traceback" not in log, log[-6000:]


def probe(link: Link, port: int, name: str) -> dict:
    done = link.client(sys.executable, "-c", PROBE, SERVER_ADDR, link.client_if, str(port), name, timeout=30)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.mark.parametrize("port", [PORT, WILDCARD_PORT], ids=["link-local", "wildcard"])
def test_replies_leave_from_the_link_local_address_on_its_link(link: Link, served: Path, port: int) -> None:
    result = probe(link, port, "big.bin")
    assert result.get("size") == len(BIG), result
    # Every datagram (OACK, DATA) came from fe80::1 on the client's link, from a transfer port.
    assert {tuple(source) for source in result["sources"]} == {(SERVER_ADDR, link.client_if, True)}
    # The MTU of the link (veth: 1500) caps blksize: the path MTU probe works with a scoped address.
    assert result["blksize"] == 1500 - 40 - 8 - 4


@pytest.mark.parametrize("port", [PORT, WILDCARD_PORT], ids=["link-local", "wildcard"])
def test_errors_from_the_listening_port_leave_from_the_link_local_address(link: Link, served: Path,
                                                                          port: int) -> None:
    result = probe(link, port, "missing.bin")
    assert result["error"] == "File not found"
    assert result["sources"] == [[SERVER_ADDR, link.client_if, False]]


@pytest.mark.parametrize("port", [PORT, WILDCARD_PORT], ids=["link-local", "wildcard"])
def test_curl(link: Link, served: Path, tmp_path: Path, port: int) -> None:
    out = tmp_path / "hello.txt"
    done = link.client("curl", "-sS", "-g", "--max-time", "20", "-o", str(out),
                       f"tftp://[{SERVER_ADDR}%25{link.client_if}]:{port}/hello.txt")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == HELLO


@pytest.mark.parametrize("port", [PORT, WILDCARD_PORT], ids=["link-local", "wildcard"])
def test_tftp_hpa(link: Link, served: Path, tmp_path: Path, port: int) -> None:
    out = tmp_path / "big.bin"
    done = link.client("tftp", "-m", "binary", f"{SERVER_ADDR}%{link.client_if}", str(port),
                       "-c", "get", "big.bin", str(out))
    assert out.exists() and out.read_bytes() == BIG, done.stderr + done.stdout


@pytest.mark.parametrize("port", [PORT, WILDCARD_PORT], ids=["link-local", "wildcard"])
def test_backend_sees_the_scope_as_an_interface_name(link: Link, served: Path, tmp_path: Path,
                                                     port: int) -> None:
    """--root-per-client ip names a link-local client's directory fe80::2%IF by the local
    address's scope: the client gets that directory's file only if the scope is the name."""
    out = tmp_path / "who.txt"
    done = link.client("curl", "-sS", "-g", "--max-time", "20", "-o", str(out),
                       f"tftp://[{SERVER_ADDR}%25{link.client_if}]:{port}/who.txt")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == b"fe80::2 on the server's link\n"



def test_bind_address_keeps_the_scope() -> None:
    """Python's bind() drops a scope written in the address: it must become the scope id."""
    assert bind_address("::1", 69) == ("::1", 69)
    assert bind_address("fe80::1%lo", 69) == ("fe80::1", 69, 0, socket.if_nametoindex("lo"))
    with pytest.raises(OSError, match="no interface named 'nosuch0'"):
        bind_address("fe80::1%nosuch0", 69)


@pytest.fixture(scope="module")
def served_by_mac(link: Link, tmp_path_factory: pytest.TempPathFactory,
                  request: pytest.FixtureRequest) -> Iterator[Path]:
    """twistd with --root-per-client mac on [::]:6971 (IPv4 too), a directory for the client's MAC."""
    root = tmp_path_factory.mktemp("root")
    (root / "who.txt").write_bytes(b"everyone\n")
    (root / "hello.txt").write_bytes(HELLO)
    (root / CLIENT_MAC.replace(":", "-")).mkdir()
    (root / CLIENT_MAC.replace(":", "-") / "who.txt").write_bytes(b"02:00:00:00:00:02\n")
    with twistd_in(link, ["--root", str(root), "--root-per-client", "mac", "--listen", f"[::]:{MAC_PORT}"],
                   tmp_path_factory, request, listeners=1):
        yield root


@pytest.mark.parametrize("host", [CLIENT_V4, "link-local"])
def test_root_per_client_mac(link: Link, served_by_mac: Path, tmp_path: Path, host: str) -> None:
    """The client's MAC comes from the server's neighbour table, learnt from its ARP or NDP."""
    server = SERVER_V4 if host == CLIENT_V4 else f"[{SERVER_ADDR}%25{link.client_if}]"
    for name, expected in (("who.txt", b"02:00:00:00:00:02\n"), ("hello.txt", HELLO),
                           (f"{CLIENT_MAC.replace(':', '-')}/who.txt", None)):
        out = tmp_path / name.replace("/", "_")
        done = link.client("curl", "-sS", "-g", "--max-time", "20", "-o", str(out),
                           f"tftp://{server}:{MAC_PORT}/{name}")
        if expected is None:  # its own directory, asked for by name through the root: not served
            assert done.returncode == 68, done.stderr  # curl: TFTP file not found
        else:
            assert done.returncode == 0, done.stderr
            assert out.read_bytes() == expected
