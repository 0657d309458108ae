"""End to end: real TFTP clients against a real `twistd -n tftp-offload` process.

Every client runs as a subprocess with a timeout; every loop is bounded in count and time;
all traffic goes to 127.0.0.1 or ::1 only.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest

from tests.support import tftp_client
from tests.support.harness import BIG_FILE, HOSTS, REPO, StartServer, TwistdServer, url_host
from tests.support.tftp_client import Address

LOADGEN = REPO / "tests" / "support" / "loadgen.py"
SMALL = ["1k.bin", "1m.bin"]


def run(cmd: Sequence[str], timeout: float = 120) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(list(cmd), check=False, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run scripts/setup")
    return path


def same_bytes(got: Path, want: Path) -> None:
    assert got.exists(), f"{got} was not written"
    assert got.stat().st_size == want.stat().st_size, f"{got}: {got.stat().st_size} bytes, want {want.stat().st_size}"
    assert got.read_bytes() == want.read_bytes(), f"{got} differs from {want}"


def curl_url(server: TwistdServer, host: str, name: str) -> str:
    return f"tftp://{url_host(host)}:{server.port}/{name}"


def curl_get(server: TwistdServer, host: str, name: str, out: Path, *extra: str,
             timeout: float = 120) -> "subprocess.CompletedProcess[str]":
    return run(["curl", "-sS", "--max-time", str(int(timeout)), *extra, "-o", str(out),
                curl_url(server, host, name)], timeout=timeout + 10)


def loadgen(server: TwistdServer, host: str, name: str, *args: str, count: int = 1,
            timeout: float = 240) -> Dict[str, object]:
    """The project's load generator (tests/support/loadgen.py): every transfer verified against the served file."""
    proc = run([sys.executable, str(LOADGEN), "--host", host, "--port", str(server.port), "--root", str(server.root),
                "--file", name, "--count", str(count), "--max-time", str(int(timeout - 10)), *args], timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output from the load generator (exit {proc.returncode}): {proc.stderr}"
    stats = json.loads(lines[-1])
    assert (stats["ok"], stats["failed"], stats["verify_fail"]) == (count, 0, 0), proc.stdout + proc.stderr
    assert stats["verified"] is True and proc.returncode == 0, proc.stdout + proc.stderr
    return stats


# ------------------------------------------------------- byte-identical --


def served(request: pytest.FixtureRequest, server: TwistdServer, name: str) -> Path:
    """The served file `name`; asking for the 100 MiB one creates it (once per session)."""
    if name == BIG_FILE:
        request.getfixturevalue("big_file")
    return server.root / name


def cases(*names: str, hosts: Sequence[str] = HOSTS) -> List[Tuple[str, str]]:
    return [(name, host) for name in names for host in hosts]


# 100 MiB crosses the 16-bit block number (65535 blocks) at blksize 512 and at 1468. Each client
# fetches it once, over one address family or the other, to keep the suite's time in bounds
# (about 1-4 s each here).
@pytest.mark.parametrize("blksize", [512, 1468])
@pytest.mark.parametrize("name,host", [*cases(*SMALL), (BIG_FILE, "::1")])
def test_curl(request: pytest.FixtureRequest, twistd_server: TwistdServer, tmp_path: Path,
              name: str, host: str, blksize: int) -> None:
    need("curl")
    want = served(request, twistd_server, name)
    out = tmp_path / name
    proc = curl_get(twistd_server, host, name, out, "--tftp-blksize", str(blksize))
    assert proc.returncode == 0, proc.stderr
    same_bytes(out, want)


@pytest.mark.parametrize("name,host", [*cases(*SMALL), (BIG_FILE, "127.0.0.1")])
def test_tftp_hpa(request: pytest.FixtureRequest, twistd_server: TwistdServer, tmp_path: Path,
                  name: str, host: str) -> None:
    """tftp-hpa sends no options (plain RFC 1350 lock-step, 512-byte blocks) and exits 0 on errors."""
    need("tftp")
    want = served(request, twistd_server, name)
    out = tmp_path / name
    proc = run(["tftp", "-m", "binary", host, str(twistd_server.port), "-c", "get", name, str(out)])
    assert proc.returncode == 0 and "rror" not in proc.stderr + proc.stdout, proc.stdout + proc.stderr
    assert "timed out" not in proc.stderr + proc.stdout, proc.stdout + proc.stderr
    same_bytes(out, want)


@pytest.mark.parametrize("name,host", [*cases(*SMALL), (BIG_FILE, "127.0.0.1")])
def test_atftp_windowed(request: pytest.FixtureRequest, twistd_server: TwistdServer, tmp_path: Path,
                        name: str, host: str) -> None:
    """atftp asks for blksize, windowsize and tsize: the one Debian client that exercises RFC 7440."""
    need("atftp")
    want = served(request, twistd_server, name)
    out = tmp_path / name
    proc = run(["atftp", "--option", "blksize 1468", "--option", "windowsize 16", "--option", "tsize 0",
                "-g", "-r", name, "-l", str(out), host, str(twistd_server.port)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    same_bytes(out, want)


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize(
    "name,args",
    [
        ("1k.bin", ["--blksize", "1468", "--tsize"]),
        ("1m.bin", ["--blksize", "512", "--windowsize", "64"]),
        ("1m.bin", ["--blksize", "8192", "--windowsize", "16", "--tsize"]),
        # 204,801 blocks: the block number wraps 65535 -> 0 three times.
        (BIG_FILE, ["--blksize", "512", "--windowsize", "64", "--tsize"]),
    ],
)
def test_loadgen(request: pytest.FixtureRequest, twistd_server: TwistdServer, host: str, name: str,
                 args: List[str]) -> None:
    want = served(request, twistd_server, name)
    stats = loadgen(twistd_server, host, name, *args)
    assert stats["bytes"] == want.stat().st_size


@pytest.mark.parametrize("host", HOSTS)
def test_loadgen_concurrent(twistd_server: TwistdServer, host: str) -> None:
    """A small storm: 200 windowed downloads, 20 at once, every one verified."""
    stats = loadgen(twistd_server, host, "1m.bin", "--blksize", "1468", "--windowsize", "16", "--tsize",
                    "--concurrency", "20", count=200)
    assert stats["bytes"] == 200 * (twistd_server.root / "1m.bin").stat().st_size


def test_own_client_windowed_rollover(twistd_server: TwistdServer, big_file: Path) -> None:
    """Our own client over ::1: OACK echoes only what was asked, and the rollover goes to 0."""
    result = tftp_client.get("::1", twistd_server.port, BIG_FILE.encode(),
                             {"blksize": "1468", "windowsize": "32", "tsize": "0"}, deadline=180)
    assert result.error is None and result.complete, result
    assert result.oack == {"blksize": "1468", "windowsize": "32", "tsize": str(big_file.stat().st_size)}
    assert result.data == big_file.read_bytes()


# ------------------------------------------------------ errors, refusals --


@pytest.mark.parametrize("host", HOSTS)
def test_missing_file(twistd_server: TwistdServer, tmp_path: Path, host: str) -> None:
    proc = curl_get(twistd_server, host, "no-such-file", tmp_path / "out", timeout=20)
    assert proc.returncode == 68, (proc.returncode, proc.stderr)  # CURLE_TFTP_NOTFOUND
    result = tftp_client.get(host, twistd_server.port, b"no-such-file", deadline=10)
    assert result.error is not None and result.error[0] == 1, result
    assert result.data == b""


@pytest.mark.parametrize(
    "name",
    [b"1k.bin/x", b"a" * 300, b"sub/" + b"b" * 255 + b"/c", b"sub", b"sub/", b".", b"/"],
    ids=["below-a-file", "name-too-long", "component-too-long", "directory", "directory-slash", "dot", "root"],
)
def test_odd_names_refused(twistd_server: TwistdServer, name: bytes) -> None:
    """Names the file system rejects get file-not-found or access-violation, not an internal error
    (and, checked by the fixture, no traceback in the log)."""
    result = tftp_client.get("127.0.0.1", twistd_server.port, name, deadline=10)
    assert result.error is not None and result.error[0] in (1, 2), result
    assert result.data == b""


TRAVERSALS = [
    b"../etc/passwd",
    b"/../../etc/passwd",
    b"sub/../../etc/passwd",
    b"..\\..\\etc\\passwd",
    b"escape",  # a symlink in the root pointing at /etc/passwd
    b"escape-dir/passwd",  # a symlink in the root pointing at /etc
    b"/etc/passwd/../../../etc/passwd",
]


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("name", TRAVERSALS)
def test_traversal_refused(twistd_server: TwistdServer, host: str, name: bytes) -> None:
    result = tftp_client.get(host, twistd_server.port, name, deadline=10)
    assert result.error is not None and result.error[0] == 2, result
    assert result.data == b"" and result.oack is None


def test_traversal_curl_path_as_is(twistd_server: TwistdServer, tmp_path: Path) -> None:
    out = tmp_path / "passwd"
    proc = curl_get(twistd_server, "127.0.0.1", "../../etc/passwd", out, "--path-as-is", timeout=20)
    assert proc.returncode != 0
    assert not out.exists() or out.stat().st_size == 0


def test_absolute_path_inside_root(twistd_server: TwistdServer) -> None:
    """A leading / means the root (ROMs ask for /pxelinux.0); \\ is a separator."""
    for name in (b"/1k.bin", b"sub\\inner.bin", b"/sub/./inner.bin"):
        result = tftp_client.get("127.0.0.1", twistd_server.port, name, deadline=10)
        want = (twistd_server.root / name.decode().replace("\\", "/").lstrip("/")).read_bytes()
        assert result.complete and result.data == want, (name, result)


@pytest.mark.parametrize("host", HOSTS)
def test_wrq_refused(twistd_server: TwistdServer, tmp_path: Path, host: str) -> None:
    local = tmp_path / "upload.bin"
    local.write_bytes(b"x" * 2000)
    proc = run(["curl", "-sS", "--max-time", "20", "-T", str(local), curl_url(twistd_server, host, "upload.bin")],
               timeout=30)
    assert proc.returncode != 0, proc.stderr
    proc = run(["tftp", "-m", "binary", host, str(twistd_server.port), "-c", "put", str(local), "upload2.bin"],
               timeout=60)
    assert "rror" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    reply, _ = tftp_client.first_reply(host, twistd_server.port, tftp_client.request(tftp_client.WRQ, b"upload3.bin"))
    assert tftp_client.opcode_of(reply) == tftp_client.ERROR, reply
    for name in ("upload.bin", "upload2.bin", "upload3.bin"):
        assert not (twistd_server.root / name).exists()


# ---------------------------------------------------------------- fuzz --

FUZZ_COUNT = 10_000
FUZZ_SECONDS = 60.0


def random_datagram(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randint(0, 600))


def near_valid_requests(rng: random.Random, count: int) -> List[bytes]:
    """RRQ-shaped datagrams with one thing wrong (or right in an odd way)."""
    names = [b"1k.bin", b"hello.txt", b"no-such", b"../etc/passwd", b"", b"a" * 500, b"\xff\xfe", b"sub/"]
    modes = [b"octet", b"OCTET", b"netascii", b"mail", b"binary", b"", b"oct\xffet"]
    opts = [b"blksize", b"tsize", b"timeout", b"windowsize", b"rollover", b"BLKSIZE", b"x" * 300, b""]
    values = [b"0", b"1", b"7", b"8", b"512", b"65464", b"65465", b"-1", b"99999999999999999999999", b"",
              b"1e3", b" 512", b"0x200", b"\xff"]
    out = []
    for _ in range(count):
        packet = struct.pack("!H", rng.choice([1, 1, 1, 2, 0, 7, 1 << 15])) + rng.choice(names)
        packet += b"\0" + rng.choice(modes)
        for _ in range(rng.randint(0, 4)):
            packet += b"\0" + rng.choice(opts) + b"\0" + rng.choice(values)
        if rng.random() < 0.8:
            packet += b"\0"  # else: the last field is unterminated
        if rng.random() < 0.1:
            packet = packet[: rng.randint(0, len(packet))]
        out.append(packet)
    return out


def pending(sock: socket.socket, limit: int = 10_000) -> List[bytes]:
    """Every datagram waiting on `sock`, without blocking."""
    got: List[bytes] = []
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
        for _ in range(limit):
            got.append(sock.recv(70000))
    return got


def is_error(datagram: bytes, code: int) -> bool:
    return tftp_client.opcode_of(datagram) == tftp_client.ERROR and tftp_client.parse_error(datagram)[0] == code


def fuzz_send(target: Address, sends: Sequence[Tuple[socket.socket, bytes]]) -> Dict[socket.socket, List[bytes]]:
    """Send (socket, datagram) pairs to `target`, paced (a pause every 100) so that the server's receive
    buffer is not what is measured; returns what each socket got back. Bounded by FUZZ_SECONDS."""
    end = time.monotonic() + FUZZ_SECONDS
    replies: Dict[socket.socket, List[bytes]] = {sock: [] for sock, _ in sends}
    for i, (sock, datagram) in enumerate(sends):
        with contextlib.suppress(OSError):  # e.g. ECONNREFUSED from an earlier ICMP error
            sock.sendto(datagram, target)
        if i % 100 == 99:
            time.sleep(0.003)
            for s in replies:
                replies[s] += pending(s)
            assert time.monotonic() < end, f"fuzzing took longer than {FUZZ_SECONDS} s ({i} sent)"
    time.sleep(0.2)
    for s in replies:
        replies[s] += pending(s)
    return replies


def still_serving(server: TwistdServer, tmp_path: Path) -> None:
    for host in server.hosts:
        out = tmp_path / f"after-{host}.bin"
        proc = curl_get(server, host, "1m.bin", out, "--tftp-blksize", "1468", timeout=30)
        assert proc.returncode == 0, proc.stderr
        same_bytes(out, server.root / "1m.bin")
    server.assert_healthy()


@pytest.mark.parametrize("host", HOSTS)
def test_fuzz_listening_port(twistd_factory: StartServer, tmp_path: Path, host: str) -> None:
    server = twistd_factory("--give-up", "3", "--drain-timeout", "0.5")  # stray transfers of crafted RRQs
    rng = random.Random(1350)
    datagrams = [random_datagram(rng) for _ in range(FUZZ_COUNT)]
    datagrams += near_valid_requests(rng, 1000)
    rng.shuffle(datagrams)
    sockets = [tftp_client.udp_socket(host) for _ in range(4)]
    try:
        fuzz_send((host, server.port), [(sockets[i % 4], d) for i, d in enumerate(datagrams)])
    finally:
        for sock in sockets:
            sock.close()
    still_serving(server, tmp_path)


@pytest.mark.parametrize("host", HOSTS)
def test_fuzz_transfer_port(twistd_factory: StartServer, tmp_path: Path, host: str) -> None:
    """Garbage at a live transfer's port, from strangers and then from its own client, leaves the server
    serving; strangers get ERROR 5 and do not disturb the transfer."""
    server = twistd_factory("--timeout", "2", "--give-up", "30")
    rng = random.Random(7440)
    crafted = [tftp_client.rrq(b"1k.bin"), struct.pack("!HH", 3, 1) + b"x" * 512, b"\0\6blksize\0512\0",
               tftp_client.ack(0), tftp_client.ack(1), tftp_client.error(0, b"stop"), b"\0\4", b""]
    client = tftp_client.udp_socket(host)
    strangers = [tftp_client.udp_socket(host) for _ in range(3)]
    try:
        client.settimeout(5)
        client.sendto(tftp_client.rrq(b"1m.bin", options={"blksize": "1468"}), (host, server.port))
        first, addr = client.recvfrom(70000)  # an OACK; we never ACK it, so the transfer stays young
        assert tftp_client.opcode_of(first) == tftp_client.OACK, first
        transfer = (addr[0], addr[1])
        assert transfer[1] != server.port

        # Phase 1: strangers send random and crafted datagrams (ERRORs included); the client sends only
        # well-formed ACKs of blocks never sent. None of it may end or disturb the transfer.
        sends: List[Tuple[socket.socket, bytes]] = []
        for _ in range(FUZZ_COUNT - 500):
            roll = rng.random()
            if roll < 0.6:
                sends.append((rng.choice(strangers), random_datagram(rng)))
            elif roll < 0.7:
                sends.append((rng.choice(strangers), rng.choice(crafted)))
            else:
                sends.append((client, tftp_client.ack(rng.randrange(2, 65536))))
        replies = fuzz_send(transfer, sends)
        assert any(is_error(d, 5) for s in strangers for d in replies[s]), "strangers should get ERROR 5"
        client_got = replies[client]
        assert not any(tftp_client.opcode_of(d) == tftp_client.ERROR for d in client_got), client_got[:5]
        assert server.alive()

        # Phase 2: the client itself sends garbage: the transfer may end (ERROR 4), the server must not.
        sends = [(client, random_datagram(rng)) for _ in range(500)]
        fuzz_send(transfer, sends)
    finally:
        for sock in [client, *strangers]:
            sock.close()
    still_serving(server, tmp_path)


@pytest.mark.parametrize("host", HOSTS)
def test_single_port_with_real_clients(twistd_factory: StartServer, tmp_path: Path, host: str) -> None:
    """--single-port with curl and tftp-hpa (which take the first reply's port as the server's)."""
    need("curl")
    need("tftp")
    server = twistd_factory("--single-port")
    want = server.root / "1m.bin"
    proc = curl_get(server, host, "1m.bin", tmp_path / "curl", "--tftp-blksize", "1468")
    assert proc.returncode == 0, proc.stderr
    same_bytes(tmp_path / "curl", want)
    proc = run(["tftp", "-m", "binary", host, str(server.port), "-c", "get", "1m.bin", str(tmp_path / "hpa")])
    assert "rror" not in proc.stderr + proc.stdout and "timed out" not in proc.stderr + proc.stdout, proc.stderr
    same_bytes(tmp_path / "hpa", want)
