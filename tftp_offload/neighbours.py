"""A client's hardware (MAC) address, from the kernel's neighbour table (ARP for IPv4, NDP for IPv6).

For `--root-per-client mac`, as dnsmasq's `--tftp-unique-root=mac`: a client
on a directly attached link has just resolved our address, and the kernel
learnt its MAC from that exchange. The table is read over rtnetlink (one dump
per address family), kept for a second, and read again early only on a miss
(at most ten times a second), so that a boot storm of new clients costs a few
dumps a second, not one per request.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Callable, Dict, Optional, Tuple

RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NDA_DST, NDA_LLADDR = 1, 2
NUD_INCOMPLETE, NUD_FAILED, NUD_NOARP = 0x01, 0x20, 0x40

_NLMSGHDR = struct.Struct("=IHHII")
_NDMSG = struct.Struct("=BxxxiHBB")
_RTATTR = struct.Struct("=HH")

MAX_AGE = 1.0
"""Seconds a dump of the table is used for."""
MISS_INTERVAL = 0.1
"""Seconds at least between dumps made because an address was missing."""

Table = Dict[bytes, Dict[int, bytes]]
"""Packed address -> {interface index: hardware address}."""


def dump(family: int) -> Table:
    """The kernel's neighbour entries of `family` with a known hardware address."""
    entries: Table = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(1.0)
        body = _NDMSG.pack(family, 0, 0, 0, 0)
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if kind in (NLMSG_DONE, NLMSG_ERROR) or length < _NLMSGHDR.size:
                    return entries
                if kind == RTM_NEWNEIGH:
                    _entry(data[offset + _NLMSGHDR.size:offset + length], entries)
                offset += (length + 3) & ~3


def _entry(message: bytes, entries: Table) -> None:
    _family, ifindex, state, _flags, _type = _NDMSG.unpack_from(message)
    if state & (NUD_INCOMPLETE | NUD_FAILED | NUD_NOARP):  # unresolved, or multicast and the like
        return
    attributes = {}
    offset = _NDMSG.size
    while offset + _RTATTR.size <= len(message):
        length, kind = _RTATTR.unpack_from(message, offset)
        if length < _RTATTR.size:
            break
        attributes[kind] = message[offset + _RTATTR.size:offset + length]
        offset += (length + 3) & ~3
    hardware = attributes.get(NDA_LLADDR)
    if NDA_DST in attributes and hardware and hardware.strip(b"\0"):
        entries.setdefault(attributes[NDA_DST], {})[ifindex] = hardware


class NeighbourTable:
    """`hardware_address(client, local)` answers from a recent dump of the table."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 reader: Callable[[int], Table] = dump) -> None:
        self.clock = clock
        self.reader = reader
        self._tables: Dict[int, Tuple[float, Table]] = {}

    def hardware_address(self, client: str, local: Optional[str] = None) -> Optional[str]:
        """`52-54-00-12-34-56` (dnsmasq's form) for `client`, or None when the kernel does not know it.

        A link-local client is looked for on the interface of `local`'s scope (`fe80::1%eth0`)."""
        host = client.split("%", 1)[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            packed = socket.inet_pton(family, host)
        except OSError:
            return None
        ifindex = 0
        if local and "%" in local and host.lower().startswith("fe80:"):
            try:
                ifindex = socket.if_nametoindex(local.split("%", 1)[1])
            except OSError:
                return None
        found = self._find(family, packed, ifindex, fresh=False)
        if found is None:
            found = self._find(family, packed, ifindex, fresh=True)
        return "-".join(f"{byte:02x}" for byte in found) if found is not None else None

    def _find(self, family: int, packed: bytes, ifindex: int, fresh: bool) -> Optional[bytes]:
        now = self.clock()
        read_at, table = self._tables.get(family, (float("-inf"), {}))
        if now - read_at > (MISS_INTERVAL if fresh else MAX_AGE):
            try:
                table = self.reader(family)
            except OSError:
                table = {}
            self._tables[family] = (now, table)
        links = table.get(packed, {})
        if ifindex:
            return links.get(ifindex)
        hardware = set(links.values())
        return hardware.pop() if len(hardware) == 1 else None  # two links, two MACs: unknown
