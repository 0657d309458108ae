"""A real lossy network for tests and benchmarks: two network namespaces joined by a veth pair.

This kernel has no netem, so loss is nftables on the input hook of each end
(`numgen random mod 100 < N drop`): a datagram the kernel throws away on
arrival, as a congested switch would. (An output-hook drop makes the sender's
sendto() fail with EPERM, which no real network does.) The namespaces, the veth
pair and the nftables tables live and die with the `LossyPath`; their names
carry a tag and the PID, so runs side by side do not meet. Addresses are
documentation ones (192.0.2.0/24), and only ever exist inside the namespaces.

Also `Relay`: a UDP relay on loopback that duplicates, reorders and delays
datagrams on purpose, TFTP-aware enough to give each server port (transfer ID)
a port of its own on the client's side.

Needs root, `ip` and `nft`; `available()` says why not.
"""

from __future__ import annotations

import heapq
import os
import random
import selectors
import shutil
import socket
import subprocess
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

SERVER_ADDRESS = "192.0.2.1"
CLIENT_ADDRESS = "192.0.2.2"

Address = Tuple[str, int]


def available() -> Optional[str]:
    """None if a LossyPath can be built here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    return None


def _run(*cmd: str, stdin: Optional[str] = None) -> None:
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")


class LossyPath:
    """`server` and `client` namespaces, a veth between them, `loss` percent dropped on arrival at each."""

    def __init__(self, tag: str = "tfe", loss: int = 0) -> None:
        unique = f"{tag}-{os.getpid()}-{id(self) % 10000}"
        self.server = f"{unique}-s"
        self.client = f"{unique}-c"
        self._veth = (f"{tag}{os.getpid() % 100000}{id(self) % 100}s"[:15],
                      f"{tag}{os.getpid() % 100000}{id(self) % 100}c"[:15])
        self._table = tag.replace("-", "_")
        self.loss = loss
        self._made: List[str] = []

    def __enter__(self) -> "LossyPath":
        try:
            for ns in (self.server, self.client):
                _run("ip", "netns", "add", ns)
                self._made.append(ns)
            server_if, client_if = self._veth
            _run("ip", "link", "add", server_if, "netns", self.server, "type", "veth",
                 "peer", "name", client_if, "netns", self.client)
            for ns, ifname, address in ((self.server, server_if, SERVER_ADDRESS),
                                        (self.client, client_if, CLIENT_ADDRESS)):
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", ifname)
                _run("ip", "-n", ns, "link", "set", ifname, "up")
            self.set_loss(self.loss)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the namespaces (the veth pair and the nftables tables go with them)."""
        while self._made:
            ns = self._made.pop()
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)

    def set_loss(self, percent: int) -> None:
        """Drop `percent` of the UDP datagrams arriving at either end, at random."""
        self.loss = percent
        rules = f"""
table inet {self._table}
delete table inet {self._table}
table inet {self._table} {{
    chain input {{
        type filter hook input priority 0; policy accept;
        meta l4proto udp numgen random mod 100 < {percent} counter drop
    }}
}}
"""
        for ns in (self.server, self.client):
            _run("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=rules)

    def dropped(self) -> int:
        """Datagrams dropped so far at both ends (the rule's counters; set_loss() resets them)."""
        total = 0
        for ns in (self.server, self.client):
            out = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", self._table],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            words = out.split()
            total += sum(int(words[i + 1]) for i, word in enumerate(words) if word == "packets")
        return total

    def buffer_drops(self) -> int:
        """UDP datagrams the kernel dropped for a full receive buffer, in both namespaces, so far
        (loss too, but the host's, not the path's: a benchmark should see none)."""
        total = 0
        for ns in (self.server, self.client):
            out = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
            names, values = [line.split() for line in out.splitlines() if line.startswith("Udp:")][:2]
            total += int(values[names.index("RcvbufErrors")])
        return total

    def in_server(self, cmd: Sequence[str]) -> List[str]:
        return ["ip", "netns", "exec", self.server, *cmd]

    def in_client(self, cmd: Sequence[str]) -> List[str]:
        return ["ip", "netns", "exec", self.client, *cmd]


class Relay:
    """A UDP relay between a TFTP client and server on loopback that mangles traffic on purpose.

    The client sends its RRQ to `address`; each server port that answers gets
    a relay port of its own, so the client sees one transfer ID per server
    port, as with the server itself. Every datagram, either way, may be
    duplicated, held back behind the next one (reordering), and delayed.
    Runs in a thread until `close()`; bounded: it stops by itself after
    `lifetime` seconds.
    """

    def __init__(self, server: Address, duplicate: float = 0.0, reorder: float = 0.0,
                 delay: float = 0.0, seed: int = 0, lifetime: float = 120.0) -> None:
        self.server = server
        self.duplicate = duplicate
        self.reorder = reorder
        self.delay = delay
        self.random = random.Random(seed)
        self.lifetime = lifetime
        self.selector = selectors.DefaultSelector()
        self.front = self._socket()
        self.address: Address = self.front.getsockname()
        self.selector.register(self.front, selectors.EVENT_READ, ("front", None))
        self._upstream: Dict[Address, socket.socket] = {}
        """client address -> our socket towards the server for it."""
        self._downstream: Dict[Tuple[Address, int], socket.socket] = {}
        """(client, server port) -> our socket the client sees as that server port."""
        self._queue: List[Tuple[float, int, socket.socket, bytes, Address]] = []
        self._held: Optional[Tuple[socket.socket, bytes, Address]] = None
        self._seq = 0
        self.forwarded = 0
        self.duplicated = 0
        self.reordered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def _socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in [self.front, *self._upstream.values(), *self._downstream.values()]:
            sock.close()
        self.selector.close()

    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- mangling --

    def _forward(self, sock: socket.socket, datagram: bytes, to: Address) -> None:
        rand = self.random.random
        copies = 2 if rand() < self.duplicate else 1
        self.duplicated += copies - 1
        for _ in range(copies):
            if self._held is None and rand() < self.reorder:
                self._held = (sock, datagram, to)  # goes out after the next one
                self.reordered += 1
                continue
            self._schedule(sock, datagram, to)
            if self._held is not None:
                self._schedule(*self._held)
                self._held = None

    def _schedule(self, sock: socket.socket, datagram: bytes, to: Address) -> None:
        self._seq += 1
        when = time.monotonic() + (self.random.random() * self.delay if self.delay else 0.0)
        heapq.heappush(self._queue, (when, self._seq, sock, datagram, to))

    def _flush(self, now: float) -> None:
        while self._queue and self._queue[0][0] <= now:
            _, _, sock, datagram, to = heapq.heappop(self._queue)
            try:
                sock.sendto(datagram, to)
                self.forwarded += 1
            except OSError:
                pass  # a full buffer: loss, as on a real network

    # -- the loop --

    def _loop(self) -> None:
        end = time.monotonic() + self.lifetime
        while not self._stop.is_set() and time.monotonic() < end:
            wait = 0.05
            if self._queue:
                wait = max(0.0, min(wait, self._queue[0][0] - time.monotonic()))
            if self._held is not None:
                wait = min(wait, 0.002)
            for key, _ in self.selector.select(wait):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                kind, meta = key.data
                while True:
                    try:
                        datagram, peer = sock.recvfrom(70000)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    self._received(sock, kind, meta, datagram, (peer[0], peer[1]))
            if self._held is not None and not self._queue:
                # Nothing came to overtake it: let it go rather than hold it for ever.
                self._schedule(*self._held)
                self._held = None
            self._flush(time.monotonic())

    def _received(self, sock: socket.socket, kind: str, meta: object, datagram: bytes, peer: Address) -> None:
        if kind == "front":  # from a client, to the server's request port
            self._forward(self._upstream_for(peer), datagram, self.server)
        elif kind == "up":  # from the server (a transfer port), to the client it serves
            client = meta  # type: ignore[assignment]
            self._forward(self._downstream_for(client, peer[1]), datagram, client)  # type: ignore[arg-type]
        else:  # from the client, to the server port this socket stands for
            _client, server_port = meta  # type: ignore[misc]
            self._forward(self._upstream[_client], datagram, (self.server[0], server_port))

    def _upstream_for(self, client: Address) -> socket.socket:
        sock = self._upstream.get(client)
        if sock is None:
            sock = self._upstream[client] = self._socket()
            self.selector.register(sock, selectors.EVENT_READ, ("up", client))
        return sock

    def _downstream_for(self, client: Address, server_port: int) -> socket.socket:
        key = (client, server_port)
        sock = self._downstream.get(key)
        if sock is None:
            sock = self._downstream[key] = self._socket()
            self.selector.register(sock, selectors.EVENT_READ, ("down", key))
        return sock
