"""How the server's log events read: as an operator writes things, with the same fields for machines.

Every event carries plain structured fields (strings and numbers, never
bytes or tuples), so `--log-format json` can write them as they are, and its
text reads `complete pxelinux.0 to 192.0.2.77:2070 ...`, not Python reprs.

Outcomes, the `outcome` field of each `transfer-end` event (the one
vocabulary; docs/operations.md lists it):

- complete: the client acknowledged the last block.
- probe: the client asked for the size (tsize), got the OACK and ended with an
  ERROR before any data: the UEFI size probe. Normal; its real request follows.
- client-error: the client ended the transfer with an ERROR.
- timeout: the client stopped answering (no progress for --give-up seconds).
- protocol-error: the client sent something that is not an ACK; it got ERROR 4.
- aborted: ended from our side (shutdown, a read error, a new request from
  the same client port).
- refused: the request got an ERROR before any transfer (file not found,
  access violation, backend failure or timeout, a write request, a malformed
  request).
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any, Dict, Optional, Tuple

from twisted.logger import ILogObserver, LogEvent, formatEvent
from twisted.python.logfile import LogFile
from zope.interface import implementer

from .engine import Outcome

COMPLETE, PROBE, CLIENT_ERROR, TIMEOUT, PROTOCOL_ERROR, ABORTED, REFUSED = (
    outcome.value for outcome in (Outcome.COMPLETE, Outcome.PROBE, Outcome.CLIENT_ERROR, Outcome.TIMEOUT,
                                  Outcome.PROTOCOL_ERROR, Outcome.ABORTED, Outcome.REFUSED))
OUTCOMES = tuple(outcome.value for outcome in Outcome)
"""Every value of a transfer-end event's `outcome`; COMPLETE and PROBE are the normal ones."""


def address(host: str, port: int) -> str:
    """`127.0.0.1:43442`, `[::1]:43442`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def filename(name: bytes) -> str:
    """A requested name as text: UTF-8 where it is, `\\xff` for other bytes, control characters escaped.

    A name is whatever bytes a client sent: it must neither break a log line
    (a newline) nor hide behind a repr.
    """
    text = name.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def client_error(text: Optional[str]) -> Tuple[Optional[int], Optional[str]]:
    """The engine's "code: message" of a client's ERROR, as (code, message)."""
    if text is None:
        return None, None
    code, _, message = text.partition(": ")
    return (int(code), message) if code.isdigit() else (None, text)


def end_text(fields: Dict[str, Any]) -> str:
    """The text of a transfer-end event: what an operator wants first, details after.

    Rendered here, once, and handed to the logger as the one field of a "{log_text}" format:
    Twisted's formatter parsing a dozen placeholders per transfer cost more than the rest of
    the line (a boot storm's small files each write one)."""
    outcome = fields["outcome"]
    if outcome == REFUSED:
        return (f"refused {fields['file']} to {fields['client']}: {fields['error_message']} "
                f"(ERROR {fields['error_code']})")
    if outcome == PROBE:
        text = f"probe {fields['file']} to {fields['client']}: told the size, {fields['size']} bytes, " \
               f"in {fields['duration']:.3f}s"
    else:
        text = f"{outcome} {fields['file']} to {fields['client']}: {fields['bytes']} bytes"
        if outcome != COMPLETE and fields.get("size") is not None:
            text += f" of {fields['size']}"
        text += f" in {fields['duration']:.3f}s"
    details = []
    if fields.get("kind"):
        details.append(str(fields["kind"]))
    if fields.get("blksize") is not None:
        details.append(f"blksize {fields['blksize']}, windowsize {fields['windowsize']}")
    if fields.get("retransmits"):
        details.append(f"{fields['retransmits']} retransmitted")
    if details:
        text += f" ({', '.join(details)})"
    if fields.get("error_message") is not None:
        who = "the client said" if fields.get("error_by") == "client" else "sent"
        text += f"; {who} ERROR {fields['error_code']}: {fields['error_message']}"
    return text


# ---------------------------------------------------------------- --log-format json --


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return filename(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def event_as_json(event: LogEvent) -> str:
    """One log event as one line of JSON: time, level, namespace, text, then the event's own fields."""
    record: Dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", time.time())))
        + f".{int((event.get('log_time', 0) % 1) * 1000):03d}Z",
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "text": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if not key.startswith("log_") and key not in record and key not in ("failure", "format", "message",
                                                                              "isError", "system", "time"):
            record[key] = _plain(value)
    return json.dumps(record, ensure_ascii=False)


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one JSON object per line (`jq` reads it as is, no `--seq`)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: LogEvent) -> None:
        self.out.write(event_as_json(event) + "\n")
        self.out.flush()


def json_observer(logfile: Optional[str], nodaemon: bool) -> JSONLinesObserver:
    """Where twistd would have written its text log (`--logfile`, stdout with -n, twistd.log), as JSON."""
    if logfile == "-" or (nodaemon and not logfile):
        return JSONLinesObserver(sys.stdout)
    return JSONLinesObserver(LogFile.fromFullPath(logfile or "twistd.log"))  # type: ignore[arg-type]
