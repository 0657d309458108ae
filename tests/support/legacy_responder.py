"""A clean-room stand-in for a MAAS 2.2-3.4 rack controller's legacy offload socket.

Written from the format's description (docs/legacy.md), not from MAAS's code,
so the tests check tftp-offload against the document rather than against a
copy of one implementation. It behaves as the document says rackd does:

- it parses a request as soon as it has seen three NULs, and closes without
  answering unless exactly `$` follows (so a request split after the third
  NUL, or with bytes after `$`, gets a closed connection);
- it answers `- NUL kind NUL path NUL $` or `code NUL message NUL $`, then
  closes; ephemeral (`EPH`) files are written mode 0600 into its own folder.

What it answers depends on the filename, so a test (or a subprocess with no
configuration) can ask for each behaviour:

    <path under root>        a static file (or folder):  - NUL - NUL <absolute path> NUL $
    eph/<size>/<name>        an ephemeral file of <size> bytes (see `render`): - NUL EPH NUL <path> NUL $
    error/<code>/<message>   an error reply:             <code> NUL <message> NUL $
    malformed/<kind>         one of the bad replies in MALFORMED
    hang/<anything>          accepts and never answers
    die/<anything>           closes the connection without answering (a rackd that died)
    vanish/<name>            names a static file that is not there (deleted before we open it)
    slow/<seconds>/<rest>    answers <rest> after a delay
    split/<rest>             answers <rest> in 3-byte pieces a few ms apart
    a name leaving the root  0 NUL Insecure path: b'<path>' is not a child of b'<root>' NUL $
                             (what MAAS's tx-tftp backend says, server paths and all; checked
                             lexically, as twisted's FilePath does, so symlinks are followed)
    anything else            0 NUL File not found: <name> NUL $

Filenames are bytes in the filesystem encoding (rackd serves `caf\u00e9.txt` too).

Run as a script: `python legacy_responder.py SOCKET ROOT EPH_DIR`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

from twisted.internet.protocol import Factory, Protocol

MALFORMED = {
    "empty": b"",
    "truncated": b"-\0-\0/etc/hostname",
    "no-dollar": b"-\0-\0/etc/hostname\0",
    "trailing": b"-\0-\0/etc/hostname\0$\n",
    "kind": b"-\0TMP\0/etc/hostname\0$",
    "relative": b"-\0-\0etc/hostname\0$",
    "empty-path": b"-\0-\0\0$",
    "fields": b"-\0-\0/etc/hostname\0extra\0$",
    "short": b"-\0/etc/hostname\0$",
    "code": b"x1\0File not found\0$",
    "negative": b"-1\0oops\0$",
    "utf8": b"0\0\xff\xfe\0$",
    "error-fields": b"0\0one\0two\0$",
    "oversized": b"0\0" + b"x" * 70000 + b"\0$",
}


def render(local: str, client: str, name: str, size: int) -> bytes:
    """The content of an ephemeral file: who asked (as rackd saw it), padded to `size` bytes."""
    head = f"local={local} client={client} file={name}\n".encode("utf-8", "surrogateescape")
    body = head + bytes(range(256)) * (size // 256 + 1)
    return body[:size]


@dataclass
class Seen:
    """One request as the responder parsed it, and in how many reads it arrived."""

    local: str
    client: str
    filename: bytes
    raw: bytes
    reads: int


@dataclass
class Responder:
    """The shared state: where files are, what was asked, how many connections came."""

    root: Path
    eph_dir: Path
    requests: List[Seen] = field(default_factory=list)
    connections: int = 0
    rejected: List[bytes] = field(default_factory=list)
    later: Callable[..., Any] = field(default=lambda *a: None)

    def answer(self, local: str, client: str, name: str) -> Tuple[float, Optional[bytes]]:
        """(delay, reply) for a request; a reply of None means never answer."""
        kind, _, rest = name.partition("/")
        if kind == "hang":
            return 0.0, None
        if kind == "die":
            return 0.0, b""
        if kind == "vanish":
            return 0.0, b"-\0-\0" + os.fsencode(self.root / f".vanished-{rest}") + b"\0$"
        if kind == "slow":
            seconds, _, inner = rest.partition("/")
            delay, reply = self.answer(local, client, inner)
            return delay + float(seconds), reply
        if kind == "eph":
            size, _, _ = rest.partition("/")
            fd, path = tempfile.mkstemp(dir=self.eph_dir)  # mode 0600, as rackd's
            with os.fdopen(fd, "wb") as f:
                f.write(render(local, client, name, int(size)))
            return 0.0, b"-\0EPH\0" + os.fsencode(path) + b"\0$"
        if kind == "error":
            code, _, message = rest.partition("/")
            return 0.0, code.encode() + b"\0" + os.fsencode(message) + b"\0$"
        if kind == "malformed":
            return 0.0, MALFORMED[rest]
        path = self.root / name.lstrip("/")
        lexical = os.path.normpath(path)
        if lexical != str(self.root) and not lexical.startswith(str(self.root) + os.sep):
            return 0.0, (b"0\0Insecure path: " + repr(os.fsencode(lexical)).encode() + b" is not a child of "
                         + repr(os.fsencode(self.root)).encode() + b"\0$")
        try:
            exists = bool(name) and path.exists()  # a folder too: what to do with one is the server's problem
        except OSError:  # a name too long for any file
            exists = False
        if exists:
            return 0.0, b"-\0-\0" + os.fsencode(path) + b"\0$"
        return 0.0, b"0\0File not found: " + os.fsencode(name) + b"\0$"


class ResponderProtocol(Protocol):
    def __init__(self, state: Responder) -> None:
        self.state = state
        self.buffer = b""
        self.reads = 0
        self.parsed = False

    def connectionMade(self) -> None:
        self.state.connections += 1

    def dataReceived(self, data: bytes) -> None:
        if self.parsed:
            return
        self.reads += 1
        self.buffer += data
        if self.buffer.count(b"\0") < 3:
            return
        self.parsed = True
        local, client, filename, tail = self.buffer.split(b"\0", 3)
        if tail != b"$":  # a wrong terminator, bytes after it, or a '$' still on its way: no answer
            self.state.rejected.append(self.buffer)
            self.transport.loseConnection()
            return
        seen = Seen(local.decode("ascii"), client.decode("ascii"), filename, self.buffer, self.reads)
        self.state.requests.append(seen)
        name = os.fsdecode(filename)
        split = name.startswith("split/")
        delay, reply = self.state.answer(seen.local, seen.client, name[6:] if split else name)
        if reply is None:
            return
        if split:
            self.state.later(delay, self._send_pieces, reply)
        else:
            self.state.later(delay, self._send, reply)

    def _send(self, reply: bytes) -> None:
        if self.transport.connected:
            if reply:
                self.transport.write(reply)
            self.transport.loseConnection()

    def _send_pieces(self, reply: bytes) -> None:
        if not self.transport.connected:
            return
        if len(reply) <= 3:
            self._send(reply)
            return
        self.transport.write(reply[:3])
        self.state.later(0.005, self._send_pieces, reply[3:])


def listen(reactor: Any, socket_path: str, root: Path, eph_dir: Path) -> Tuple[Responder, Any]:
    """Start a responder on `socket_path`; returns its state and the listening port."""
    state = Responder(Path(root), Path(eph_dir), later=reactor.callLater)
    port = reactor.listenUNIX(socket_path, Factory.forProtocol(lambda: ResponderProtocol(state)), mode=0o600)
    return state, port


def main(reactor: Any, socket_path: str, root: str, eph_dir: str) -> Any:
    from twisted.internet.defer import Deferred

    listen(reactor, socket_path, Path(root), Path(eph_dir))
    print(f"listening on {socket_path}", flush=True)
    return Deferred()  # until SIGTERM


if __name__ == "__main__":
    from twisted.internet.task import react

    if len(sys.argv) != 4:
        sys.exit(f"usage: {sys.argv[0]} SOCKET ROOT EPH_DIR")
    react(main, sys.argv[1:])
