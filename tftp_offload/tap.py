"""twistd wiring: `twistd -n tftp-offload --root DIR --listen HOST:PORT ...`."""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from twisted.application.service import IService
from twisted.python import usage

from .backends.directory import DirectoryBackend
from .options import MAX_BLKSIZE, MAX_WINDOWSIZE, MIN_BLKSIZE, Limits
from .service import DEFAULT_LISTEN, TFTPOffloadService


def parse_listen(text: str) -> Tuple[str, int]:
    """`HOST:PORT`, `[V6ADDR]:PORT`, or `:PORT` / `PORT` for every address (dual-stack)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise usage.UsageError(f"--listen {text!r}: expected [IPV6ADDRESS]:PORT")
    elif ":" in text:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise usage.UsageError(f"--listen {text!r}: put an IPv6 address in brackets: [{host}]:{port}")
    else:
        host, port = "", text
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise usage.UsageError(f"--listen {text!r}: port must be a number from 0 to 65535")
    return host or "::", int(port)


def _number(kind: type, low: float, high: float, name: str):  # type: ignore[no-untyped-def]
    def coerce(text: str):  # type: ignore[no-untyped-def]
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"{name} must be a number, not {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"{name} must be from {kind(low)} to {kind(high)}, not {text}")
        return value

    coerce.coerceDoc = f"From {kind(low)} to {kind(high)}."  # type: ignore[attr-defined]
    return coerce


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A TFTP read server for network boot. Files come from a directory (--root); "
        "everything is read-only. Replies leave from the address each request was sent to."
    )
    optFlags = [
        ["quiet", "q", "Log only transfers that fail, not every completed one."],
    ]
    optParameters = [
        ["root", "r", None, "Serve files from this directory."],
        ["max-blksize", None, MAX_BLKSIZE, "Largest block size granted (RFC 2348); the path MTU also caps it.",
         _number(int, MIN_BLKSIZE, MAX_BLKSIZE, "--max-blksize")],
        ["max-windowsize", None, 64, "Largest window granted, in blocks (RFC 7440).",
         _number(int, 1, MAX_WINDOWSIZE, "--max-windowsize")],
        ["max-window-bytes", None, 1 << 20, "Largest window granted, in bytes in flight.",
         _number(int, 512, 1 << 30, "--max-window-bytes")],
        ["timeout", "t", 1.0, "Seconds before the first retransmission when the client sets no timeout "
         "(RFC 2349); it doubles on each retry, up to 8.", _number(float, 0.01, 255, "--timeout")],
        ["give-up", None, 30.0, "Seconds without progress after which a transfer is abandoned.",
         _number(float, 0.01, 3600, "--give-up")],
        ["rollover", None, 0, "Block number after 65535: 0 or 1.", _number(int, 0, 1, "--rollover")],
        ["max-sessions", None, 1000, "Transfers (and backend lookups) at once; further requests are "
         "dropped, with a log line, until one ends (ROMs retry).", _number(int, 1, 1000000, "--max-sessions")],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.listen: List[Tuple[str, int]] = []

    def opt_listen(self, value: str) -> None:
        """HOST:PORT or [IPV6]:PORT to listen on; repeat for more (default: [::]:69, all addresses)."""
        self.listen.append(parse_listen(value))

    opt_l = opt_listen

    def postOptions(self) -> None:
        root: Optional[str] = self["root"]
        if root is None:
            raise usage.UsageError("--root DIR is required: the directory to serve")
        if not os.path.isdir(root):
            raise usage.UsageError(f"--root {root!r} is not a directory")
        if not self.listen:
            self.listen = list(DEFAULT_LISTEN)
        if self["give-up"] < self["timeout"]:
            raise usage.UsageError("--give-up must be at least --timeout")


def makeService(options: Options) -> IService:
    limits = Limits(
        max_blksize=options["max-blksize"],
        max_windowsize=options["max-windowsize"],
        max_window_bytes=options["max-window-bytes"],
        timeout=options["timeout"],
        give_up=options["give-up"],
        rollover=options["rollover"],
    )
    return TFTPOffloadService(
        DirectoryBackend(options["root"]),
        listen=options.listen,
        limits=limits,
        max_sessions=options["max-sessions"],
        quiet=bool(options["quiet"]),
    )
