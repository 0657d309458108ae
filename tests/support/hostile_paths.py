"""A corpus of hostile filenames, and the tree they are aimed at.

Every name here asks, one way or another, for something outside the served root (or for
something in it that must not be read: a FIFO, a device, a directory, a socket). What a
backend may do with one: refuse it with an error whose text names no server path, or serve
a file that really is inside the root. `check` says whether an outcome is one of those.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import List, Optional, Tuple

SECRET = b"SECRET: outside the served root\n"
"""The content of every file planted outside the root: seeing it served is an escape."""

INSIDE = b"inside the root\n"

_SEEDS = ["..", "../", "..\\", "/..", "\\..", "./..", ".\\..", "....//", "...", ".../", "..//", "..\\\\",
          "%2e%2e/", "%2e%2e%2f", "..%2f", "..%5c", "%252e%252e%252f", "..%c0%af", "..%c1%9c", ".%2e/",
          "%2e./", "..;/", "..%00/", "..\t/", ". ./"]
_TARGETS = ["secret", "etc/passwd", "etc\\passwd", "outside/secret"]
_ABSOLUTE = ["/etc/passwd", "//etc/passwd", "\\etc\\passwd", "\\\\server\\share\\secret", "C:\\Windows\\win.ini",
             "c:/etc/passwd", "file:///etc/passwd", "/proc/self/environ", "/proc/self/cmdline", "/dev/zero",
             "/dev/random", "~/secret", "~root/.ssh/id_rsa", "$HOME/secret", "/root/.bashrc"]
_PLANTED = ["escape", "escape-dir/secret", "sub/relative-escape", "escape-dir", "fifo", "sub/fifo", "null",
            "sub", "sub/", "sub\\", "sock", "loop", "dangling"]


def build(base: Path) -> Tuple[Path, Path]:
    """(root, outside): a served root full of traps, and a folder beside it holding secrets."""
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    (base / "secret").write_bytes(SECRET)
    (outside / "secret").write_bytes(SECRET)
    (root / "inside.txt").write_bytes(INSIDE)
    (root / "sub").mkdir()
    (root / "sub" / "inner.txt").write_bytes(INSIDE)
    (root / "escape").symlink_to(base / "secret")
    (root / "escape-dir").symlink_to(outside)
    (root / "sub" / "relative-escape").symlink_to("../../secret")
    (root / "loop").symlink_to("loop")
    (root / "dangling").symlink_to(base / "nowhere")
    os.mkfifo(root / "fifo")
    os.mkfifo(root / "sub" / "fifo")
    if os.geteuid() == 0:
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers
    listening = socket.socket(socket.AF_UNIX)
    try:
        listening.bind(os.fsencode(root / "sock"))
    except OSError:
        pass  # a path too long for a socket: that trap is simply absent
    finally:
        listening.close()
    return root, outside


def corpus(outside: Path, wire: bool = True) -> List[bytes]:
    """The hostile names, without duplicates. `wire=False` adds what cannot come over TFTP (NUL bytes)."""
    names: List[str] = []
    for seed in _SEEDS:
        for depth in (1, 2, 3, 5, 8):
            for target in _TARGETS:
                names.append(seed * depth + target)
                names.append("sub/" + seed * depth + target)
    names += _ABSOLUTE + _PLANTED
    names += [str(outside / "secret"), str(outside.parent / "secret"), str(outside) + "/../secret"]
    names += ["x" * 255 + "/../../secret", "a/" * 200 + "../" * 210 + "secret", "y" * 300, "z" * 1000,
              "/".join(["d" * 250] * 20)]
    raw = [name.encode("utf-8", "surrogateescape") for name in names]
    raw += [b"\xff\xfe/../../secret", b"..\xc0\xaf..\xc0\xafsecret", "\u2025/secret".encode(),
            "\uff0e\uff0e/secret".encode(), "..\u2215secret".encode(), b"sub/../../\xe9/../secret"]
    if not wire:
        raw += [b"inside.txt\0../../secret", b"\0", b"../\0secret", b"escape\0", b"sub/\0/../../secret"]
    seen, unique = set(), []
    for name in raw:
        if name not in seen:
            seen.add(name)
            unique.append(name)
    return unique


LEAKS = ("/tmp", "/etc", "/srv", "/root", "/home", "b'", "outside", "secret", "Traceback")


def check(name: bytes, served: Optional[bytes], error: Optional[Tuple[int, str]], root: Path) -> Optional[str]:
    """None if the outcome is acceptable; else what is wrong with it."""
    if served is not None:
        if SECRET in served or b"root:" in served:
            return f"{name!r}: served a file from outside the root"
        if served != INSIDE:
            return f"{name!r}: served something that is not a file of the root ({served[:60]!r})"
        return None
    if error is None:
        return f"{name!r}: neither served nor refused"
    code, message = error
    if code not in (0, 1, 2, 4):
        return f"{name!r}: unexpected TFTP error code {code}"
    leaked = [word for word in (*LEAKS, str(root)) if word in message]
    if leaked or "/" in message:
        return f"{name!r}: error text {message!r} names a server path"
    return None
