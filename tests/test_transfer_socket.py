"""transfer_socket.py: a transfer's sends over real loopback sockets (windows, segmentation offload)."""

from __future__ import annotations

import socket
import struct
from typing import Any, List, Tuple

import pytest

from tests.support.inprocess import get_reactor
from tests.test_mux import Recorder, client
from tftp_offload import transfer_socket
from tftp_offload.mux import TransferSockets


@pytest.mark.parametrize("gso", [True, False])
def test_a_window_arrives_as_its_datagrams(gso: bool) -> None:
    """send_all: with segmentation offload a run of equal datagrams (the last shorter) goes in
    one system call per 64 KB, and the peer still sees each datagram, in order."""
    mux = TransferSockets(get_reactor(), gso=gso)
    transfer = mux.open("127.0.0.1", Recorder())
    peer = client()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    try:
        window = [bytes([i]) * 1472 for i in range(60)] + [b"tail"]
        assert transfer.send_all(window, peer.getsockname()) == len(window)
        assert [peer.recvfrom(2000)[0] for _ in window] == window
        assert mux.gso is gso
    finally:
        peer.close()
        mux.close()


class CallRecorder:
    """A socket's stand-in that records each send call (name, datagrams in it) and makes it."""

    def __init__(self, skt: socket.socket) -> None:
        self.skt = skt
        self.calls: List[Tuple[str, int]] = []

    def sendto(self, data: bytes, addr: Tuple[str, int]) -> int:
        self.calls.append(("sendto", 1))
        return self.skt.sendto(data, addr)

    def sendmsg(self, buffers: List[bytes], control: Any, flags: int, addr: Tuple[str, int]) -> int:
        (size,) = struct.unpack("=H", control[0][2])
        self.calls.append(("sendmsg", -(-len(buffers[0]) // size)))
        return self.skt.sendmsg(buffers, control, flags, addr)


def test_a_window_goes_first_datagram_alone_then_64_kb_at_a_time() -> None:
    """The first datagram of a window goes on its own (the client starts on it while the kernel
    cuts the rest), then one segmentation-offload send per 64 KB."""
    mux = TransferSockets(get_reactor())
    transfer = mux.open("127.0.0.1", Recorder())
    recorder = CallRecorder(transfer.socket)  # type: ignore[arg-type]
    transfer.socket = recorder  # type: ignore[assignment]
    peer = client()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    try:
        window = [bytes([i]) * 1472 for i in range(60)] + [b"tail"]
        assert transfer.send_all(window, peer.getsockname()) == len(window)
        assert recorder.calls == [("sendto", 1), ("sendmsg", 44), ("sendmsg", 16)]
        assert [peer.recvfrom(2000)[0] for _ in window] == window
    finally:
        transfer.socket = recorder.skt
        peer.close()
        mux.close()


def test_refused_segmentation_offload_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that refuses UDP_SEGMENT (EINVAL here: an option it does not know) still gets every
    datagram, one send each, and is not asked again."""
    monkeypatch.setattr(transfer_socket, "UDP_SEGMENT", 9999)
    mux = TransferSockets(get_reactor())
    transfer = mux.open("127.0.0.1", Recorder())
    peer = client()
    try:
        window = [b"%04d" % i * 300 for i in range(5)]
        assert transfer.send_all(window, peer.getsockname()) == 5
        assert [peer.recvfrom(2000)[0] for _ in window] == window
        assert mux.gso is False
        assert mux.open("127.0.0.1", Recorder())._gso is False
    finally:
        peer.close()
        mux.close()
