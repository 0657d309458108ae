"""The legacy MAAS offload wire format (offload/legacy_wire.py): encoding requests, parsing replies strictly."""

from __future__ import annotations

import os
from typing import Any, Tuple

import pytest

from tests.support.legacy_responder import MALFORMED
from tftp_offload.errors import AccessViolation, BackendError, error_for
from tftp_offload.offload.legacy_wire import (
    MAX_REPLY,
    ErrorAnswer,
    FileAnswer,
    MalformedReply,
    encode_request,
    error_for_answer,
    parse_reply,
    wire_host,
)

# ---------------------------------------------------------------- the format --


@pytest.mark.parametrize(
    ("host", "wire_form"),
    [
        ("192.0.2.1", b"192.0.2.1"),
        ("::ffff:192.0.2.1", b"192.0.2.1"),
        ("::ffff:c000:201", b"192.0.2.1"),  # what str(IPv6Address) gives for a mapped address before 3.13
        ("2001:db8::1", b"2001:db8::1"),
        ("fe80::1%2", b"fe80::1"),
    ],
)
def test_addresses_are_sent_plain(host: str, wire_form: bytes) -> None:
    assert wire_host(host) == wire_form


@pytest.mark.parametrize("host", ["", "localhost", "192.0.2.1\0x", "192.0.2.256"])
def test_what_is_not_an_address_is_not_sent(host: str) -> None:
    with pytest.raises(BackendError):
        wire_host(host)


def test_request_layout() -> None:
    assert encode_request("::ffff:192.0.2.1", "192.0.2.99", b"pxelinux.cfg/default") == (
        b"192.0.2.1\x00192.0.2.99\0pxelinux.cfg/default\0$"
    )
    assert encode_request("2001:db8::1", "2001:db8::2", b"") == b"2001:db8::1\x002001:db8::2\0\0$"


@pytest.mark.parametrize(("name", "why"), [(b"a\0b", "NUL in filename"), (b"\0", "NUL in filename")])
def test_filenames_that_cannot_be_sent_are_refused(name: bytes, why: str) -> None:
    with pytest.raises(AccessViolation, match=why):
        encode_request("192.0.2.1", "192.0.2.2", name)


@pytest.mark.parametrize("name", ["caf\u00e9.txt".encode(), b"\xff\xfe", "\u65e5\u672c/x".encode()])
def test_non_ascii_filenames_are_sent_as_they_came(name: bytes) -> None:
    """MAAS serves them (its responder answered a static path for caf\u00e9.txt): only NUL is refused."""
    assert encode_request("192.0.2.1", "192.0.2.2", name) == b"192.0.2.1\x00192.0.2.2\x00" + name + b"\0$"


@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        (b"-\0-\0/srv/boot/pxelinux.0\0$", FileAnswer(b"/srv/boot/pxelinux.0", False)),
        (b"-\0EPH\0/tmp/maas-x/tmpab12\0$", FileAnswer(b"/tmp/maas-x/tmpab12", True)),
        (b"-\0-\0/a$b\0$", FileAnswer(b"/a$b", False)),
        (b"-\0-\0/\xe9t\xe9\0$", FileAnswer(b"/\xe9t\xe9", False)),  # the filesystem encoding, not UTF-8
        (b"0\0File not found: b'x'\0$", ErrorAnswer(0, "File not found: b'x'")),
        (b"0\0Insecure path\0$", ErrorAnswer(0, "Insecure path")),
        (b"2\0\0$", ErrorAnswer(2, "")),
        ("0\0caf\u00e9\0$".encode(), ErrorAnswer(0, "caf\u00e9")),
    ],
)
def test_replies_parsed(reply: bytes, answer: Any) -> None:
    assert parse_reply(reply) == answer


@pytest.mark.parametrize("kind", sorted(set(MALFORMED) - {"oversized"}))
def test_malformed_replies_rejected(kind: str) -> None:
    with pytest.raises(MalformedReply):
        parse_reply(MALFORMED[kind])


@pytest.mark.parametrize("reply", [b"99999\0x\0$", b"\xd9\xa3\0x\0$", b"+1\0x\0$", b" 0\0x\0$", b"\0x\0$"])
def test_error_code_must_be_a_plain_number(reply: bytes) -> None:
    with pytest.raises(MalformedReply):
        parse_reply(reply)


@pytest.mark.parametrize(
    ("answer", "tftp"),
    [
        (ErrorAnswer(0, "File not found: /var/lib/maas/boot-resources/x"), (1, "File not found")),
        (ErrorAnswer(1, "whatever"), (1, "File not found")),
        (ErrorAnswer(0, "Insecure path"), (2, "Access violation")),
        (ErrorAnswer(0, "Insecure path: b'/srv/tftp/../etc/passwd' is not a child of b'/srv/tftp'"),
         (2, "Access violation")),
        (ErrorAnswer(2, "/srv/tftp/secret is not yours"), (2, "Access violation")),
        (ErrorAnswer(0, "cannot read /var/lib/maas/x"), (0, "Backend error")),
        (ErrorAnswer(4, "C:\\boot\\bcd: no"), (4, "Unsupported operation")),
        (ErrorAnswer(0, ""), (0, "Backend error")),
        (ErrorAnswer(2, "Not yours"), (2, "Not yours")),
        (ErrorAnswer(4, "No"), (4, "No")),
        (ErrorAnswer(3, "Disk full"), (0, "Disk full")),
    ],
)
def test_error_replies_mapped(answer: ErrorAnswer, tftp: Tuple[int, str]) -> None:
    code, message, expected = error_for(error_for_answer(answer))
    assert (code, message, expected) == (*tftp, True)


def test_reply_limit_is_above_any_path() -> None:
    assert os.pathconf("/", "PC_PATH_MAX") + 16 < MAX_REPLY
