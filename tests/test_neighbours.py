"""The neighbour table (tftp_offload.neighbours) on a fake clock and a fake dump; a real table
is read by tests/test_linklocal.py, across a pair of network namespaces."""

from __future__ import annotations

import socket
from typing import Dict, List

import pytest
from twisted.internet.task import Clock

from tftp_offload.neighbours import MAX_AGE, MISS_INTERVAL, NeighbourTable, Table, dump

V4 = socket.inet_pton(socket.AF_INET, "192.0.2.5")
LINK_LOCAL = socket.inet_pton(socket.AF_INET6, "fe80::5")
MAC_A, MAC_B = bytes.fromhex("525400123456"), bytes.fromhex("5254000000bb")
LO = socket.if_nametoindex("lo")


class FakeKernel:
    def __init__(self) -> None:
        self.tables: Dict[int, Table] = {socket.AF_INET: {}, socket.AF_INET6: {}}
        self.dumps: List[int] = []

    def dump(self, family: int) -> Table:
        self.dumps.append(family)
        return {address: dict(links) for address, links in self.tables[family].items()}


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(kernel: FakeKernel, clock: Clock) -> NeighbourTable:
    return NeighbourTable(clock.seconds, kernel.dump)


def test_dnsmasq_form(kernel: FakeKernel, table: NeighbourTable) -> None:
    kernel.tables[socket.AF_INET][V4] = {2: MAC_A}
    assert table.hardware_address("192.0.2.5") == "52-54-00-12-34-56"
    assert table.hardware_address("::ffff:192.0.2.5") is None  # the server passes IPv4 plain
    assert table.hardware_address("not an address") is None


def test_one_dump_a_second_while_found(kernel: FakeKernel, table: NeighbourTable, clock: Clock) -> None:
    kernel.tables[socket.AF_INET][V4] = {2: MAC_A}
    for _ in range(100):
        assert table.hardware_address("192.0.2.5") == "52-54-00-12-34-56"
        clock.advance(MAX_AGE / 200)
    assert kernel.dumps == [socket.AF_INET]
    clock.advance(MAX_AGE)
    table.hardware_address("192.0.2.5")
    assert len(kernel.dumps) == 2


def test_a_miss_dumps_again_at_most_ten_times_a_second(kernel: FakeKernel, table: NeighbourTable,
                                                        clock: Clock) -> None:
    assert table.hardware_address("192.0.2.5") is None
    count = len(kernel.dumps)
    for _ in range(50):
        assert table.hardware_address("192.0.2.5") is None
    assert len(kernel.dumps) == count  # a storm of unknown clients does not dump per request
    kernel.tables[socket.AF_INET][V4] = {2: MAC_A}  # the kernel learns it
    clock.advance(MISS_INTERVAL * 1.5)
    assert table.hardware_address("192.0.2.5") == "52-54-00-12-34-56"


def test_link_local_on_the_request_interface(kernel: FakeKernel, table: NeighbourTable) -> None:
    kernel.tables[socket.AF_INET6][LINK_LOCAL] = {LO: MAC_A, LO + 1000: MAC_B}
    assert table.hardware_address("fe80::5", "fe80::1%lo") == "52-54-00-12-34-56"
    assert table.hardware_address("fe80::5", "fe80::1%nosuch0") is None
    assert table.hardware_address("fe80::5") is None  # two links, two MACs: which one is unknown


def test_one_mac_on_two_links_is_known(kernel: FakeKernel, table: NeighbourTable) -> None:
    kernel.tables[socket.AF_INET][V4] = {2: MAC_A, 3: MAC_A}
    assert table.hardware_address("192.0.2.5") == "52-54-00-12-34-56"


def test_a_failing_dump_is_no_mac(clock: Clock) -> None:
    def broken(family: int) -> Table:
        raise PermissionError("netlink")

    assert NeighbourTable(clock.seconds, broken).hardware_address("192.0.2.5") is None


def test_real_dump_reads_this_hosts_table() -> None:
    """Whatever this host has: unicast entries with 6-byte MACs, keyed by packed address."""
    for family, size in ((socket.AF_INET, 4), (socket.AF_INET6, 16)):
        for address, links in dump(family).items():
            assert len(address) == size
            assert all(isinstance(index, int) and hardware for index, hardware in links.items())
