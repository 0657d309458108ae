"""`tftp-offload-map-test`: what a rule file makes of names, without serving anything.

    tftp-offload-map-test /etc/tftp-offload.map --client 192.0.2.169 'boot\\bcd' pxelinux.cfg/default
    printf '%s\\n' 'C:\\pxelinux.0' | tftp-offload-map-test /etc/tftp-offload.map

tftpd-hpa has no such command (its rules are only seen at work in the log);
an operator wants to try a rule file before a ROM does. With `--root` it also
prints the file that would be served, per-client roots included.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, List, Optional, TextIO

from .backends.directory import PER_CLIENT, DirectoryBackend
from .errors import TFTPError
from .remap import MapFileError, Refused, RuleSet


def show(name: bytes) -> str:
    """A name as an operator reads it: undecodable bytes as \\xNN."""
    return name.decode("utf-8", "backslashreplace")


def describe(name: bytes, rules: Optional[RuleSet], client: str, backend: Optional[DirectoryBackend]) -> str:
    """One line: `NAME -> MAPPED` (`-> PATH` with a root), or why it is refused."""
    try:
        mapped = rules.rewrite(name, client) if rules is not None else name
    except Refused as e:
        return f"{show(name)} -> refused by rule at line {e.line}"
    line = f"{show(name)} -> {show(mapped)}"
    if backend is not None:
        try:
            path = backend.locate(name, client)
        except TFTPError as e:
            return f"{line} -> {e}"
        line += f" -> {path}" if os.path.isfile(path) else f" -> {path} (not found)"
    return line


def main(argv: Optional[List[str]] = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(
        prog="tftp-offload-map-test",
        description="Print what a --map-file makes of each name (given as arguments, or one a line on stdin).")
    parser.add_argument("map_file", help="the rule file (tftpd-hpa's --map-file syntax)")
    parser.add_argument("names", nargs="*", help="requested names; none: read them from stdin")
    parser.add_argument("--client", default="192.0.2.1",
                        help="the client address \\i and \\x stand for (default: %(default)s)")
    parser.add_argument("--root", help="also print the file this served directory would send")
    parser.add_argument("--root-per-client", choices=PER_CLIENT, help="as the server's option, with --root")
    args = parser.parse_intermixed_args(argv)
    try:
        rules = RuleSet.load(args.map_file)
        backend = DirectoryBackend(args.root, args.map_file, args.root_per_client) if args.root else None
    except (MapFileError, ValueError) as e:
        print(f"tftp-offload-map-test: {e}", file=sys.stderr)
        return 2
    names: Iterable[str] = args.names or (line.rstrip("\n") for line in stdin)
    for name in names:
        if name:
            print(describe(os.fsencode(name), rules, args.client, backend), file=stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
