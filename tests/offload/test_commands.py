"""The offload commands (offload/commands.py): schema, documentation, errors (no reactor, no sockets)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from twisted.protocols import amp

from tftp_offload import errors
from tftp_offload.errors import error_for
from tftp_offload.offload import commands

DOC = Path(__file__).resolve().parents[2] / "docs" / "offload-protocol.md"


def doc_section(command: type) -> str:
    text = DOC.read_text()
    match = re.search(rf"^## {command.__name__} .*?(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/offload-protocol.md has no section for {command.__name__}"
    return match.group(0)


def names(arglist: List[Tuple[bytes, Any]]) -> List[str]:
    return [name.decode() for name, _ in arglist]


@pytest.mark.parametrize("command", commands.COMMANDS, ids=lambda c: c.__name__)
def test_every_argument_is_documented(command: Any) -> None:
    """The doc's table for each command names every argument and answer field the module defines."""
    section = doc_section(command)
    for name in names(command.arguments) + names(getattr(command, "response", [])):
        assert f"| `{name}` |" in section, f"{command.__name__}.{name} is not in docs/offload-protocol.md"
    for code in command.errors.values():
        assert code.decode() in section or code.decode() in DOC.read_text(), code


def test_every_outcome_a_report_carries_is_documented() -> None:
    """TransferFinished's `outcome` takes the values of stats.OUTCOMES, each described in the doc, and no other."""
    from tftp_offload.stats import OUTCOMES

    documented = re.findall(r"^- `([a-z-]+)`: ", doc_section(commands.TransferFinished), re.M)
    assert sorted(documented) == sorted(OUTCOMES)


def test_documented_arguments_exist() -> None:
    """...and the doc describes no argument the module does not have (it would mislead backend authors)."""
    for command in commands.COMMANDS:
        known = set(names(command.arguments) + names(getattr(command, "response", [])))
        known |= {code.decode() for code in command.errors.values()}
        documented = set(re.findall(r"^\| `(\w+)` \|", doc_section(command), re.M))
        assert documented <= known, f"{command.__name__}: documented but not defined: {documented - known}"


@pytest.mark.parametrize("code,cls", [(1, errors.FileNotFound), (2, errors.AccessViolation),
                                      (4, errors.Unsupported), (0, errors.BackendError), (3, errors.BackendError)])
def test_typed_errors_round_trip_to_tftp_codes(code: int, cls: type) -> None:
    """What the responder raises for a TFTP code comes back, through error_for, as the same code and text
    (codes without an AMP error of their own travel as 0, which every client understands)."""
    exc = errors.carrier(code, "the message")
    assert type(exc) is cls
    assert exc.__class__ in commands.ReadRequest.errors
    assert error_for(exc) == (code if code in (1, 2, 4) else 0, "the message", True)


def test_every_declared_error_has_a_distinct_code() -> None:
    for command in commands.COMMANDS:
        codes = list(command.errors.values())
        assert len(codes) == len(set(codes)), command


def test_version_settling() -> None:
    assert commands.settle_version(7, 1) == commands.PROTOCOL_VERSION
    assert commands.settle_version(1, 1) == 1
    with pytest.raises(commands.IncompatibleVersion):
        commands.settle_version(commands.PROTOCOL_VERSION + 5, commands.PROTOCOL_VERSION + 1)
    with pytest.raises(commands.IncompatibleVersion):
        commands.settle_version(0, 0)


def serialize_response(command: Any, values: Dict[str, Any]) -> bytes:
    box = command.makeResponse(values, None)
    return amp.AmpBox(box).serialize()


def test_largest_answers_fit_an_amp_value() -> None:
    """An inline answer, a stream's first bytes (one more than inline) and a chunk must not hit amp.TooLong."""
    assert commands.INLINE_MAX + 1 <= commands.AMP_VALUE_MAX
    serialize_response(commands.ReadRequest, {"kind": "inline", "data": b"x" * commands.INLINE_MAX, "size": 1})
    serialize_response(commands.ReadRequest, {"kind": "stream", "data": b"x" * (commands.INLINE_MAX + 1),
                                             "stream_id": 1})
    serialize_response(commands.ReadChunk, {"data": b"x" * commands.CHUNK_MAX, "eof": False})
    with pytest.raises(amp.TooLong):
        serialize_response(commands.ReadChunk, {"data": b"x" * (commands.AMP_VALUE_MAX + 1), "eof": False})


def test_optional_answer_fields_may_be_absent() -> None:
    """Answers carry only their kind's fields; the rest parse as None (what the server tests for)."""
    wire = serialize_response(commands.ReadRequest, {"kind": "inline", "data": b"abc"})
    parsed = commands.ReadRequest.parseResponse(amp.parse(_file(wire))[0], None)
    assert parsed["data"] == b"abc"
    assert parsed["size"] is None and parsed["fd"] is None and parsed["stream_id"] is None


def _file(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


def test_capabilities_cover_every_kind() -> None:
    assert set(commands.KINDS) <= set(commands.CAPABILITIES)
    assert set(commands.BASELINE_KINDS) <= set(commands.KINDS)
