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
import signal
import sys
import time
from typing import IO, Any, Dict, List, Mapping, Optional, Tuple, Union, cast

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent, formatTime, textFileLogObserver
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

    `fields` are a request's (`Session.fields`), every key present. Rendered here, once, and
    handed to the logger as the one field of a "{log_text}" format: Twisted's formatter parsing
    a dozen placeholders per transfer cost more than the rest of the line (a boot storm's small
    files each write one)."""
    outcome, file, client = fields["outcome"], fields["file"], fields["client"]
    if outcome == REFUSED:
        return f"refused {file} to {client}: {fields['error_message']} (ERROR {fields['error_code']})"
    kind, blksize, retransmits, message = fields["kind"], fields["blksize"], fields["retransmits"], \
        fields["error_message"]
    if outcome == COMPLETE and kind and blksize is not None and not retransmits and message is None:
        # The usual line, in one piece: formatting numbers is most of a line's cost.
        return (f"complete {file} to {client}: {fields['bytes']} bytes in {fields['duration']:.3f}s "
                f"({kind}, blksize {blksize}, windowsize {fields['windowsize']})")
    size, duration = fields["size"], fields["duration"]
    if outcome == PROBE:
        text = f"probe {file} to {client}: told the size, {size} bytes, in {duration:.3f}s"
    elif outcome == COMPLETE or size is None:
        text = f"{outcome} {file} to {client}: {fields['bytes']} bytes in {duration:.3f}s"
    else:
        text = f"{outcome} {file} to {client}: {fields['bytes']} bytes of {size} in {duration:.3f}s"
    if blksize is not None:
        sizes = f"blksize {blksize}, windowsize {fields['windowsize']}"
        details = f"{kind}, {sizes}" if kind else sizes
    else:
        details = kind or ""
    if retransmits:
        details = f"{details}, {retransmits} retransmitted" if details else f"{retransmits} retransmitted"
    if details:
        text = f"{text} ({details})"
    if message is not None:
        who = "the client said" if fields["error_by"] == "client" else "sent"
        text = f"{text}; {who} ERROR {fields['error_code']}: {message}"
    return text


def transfer_end(logger: Logger, fields: Dict[str, Any]) -> None:
    """Log a request's transfer-end event: its line (`end_text`) as "{log_text}", with every field.

    The same event `logger.info("{log_text}", log_text=..., **fields, event="transfer-end")`
    makes, handed to the logger's observer directly: `Logger.info` copies the keyword
    arguments twice and checks the level against every `LogLevel` constant, which with a
    transfer's 18 fields cost five times what the event itself costs (boot storms log one
    per small file). Only for this one event; everything else uses the Logger as usual.
    `fields` becomes the event: the caller's own dict, handed over (not copied, 30 keys a request).
    """
    keys = _EVENT_KEYS.get(logger)
    if keys is None:
        if len(_EVENT_KEYS) >= 64:  # a Logger made per use (a class attribute's, say): keep it bounded
            _EVENT_KEYS.clear()
        keys = _EVENT_KEYS[logger] = {"event": "transfer-end", "log_logger": logger, "log_level": LogLevel.info,
                                      "log_namespace": logger.namespace, "log_source": logger.source,
                                      "log_format": "{log_text}"}
    fields.update(keys)
    fields["log_text"] = end_text(fields)
    fields["log_time"] = time.time()
    logger.observer(fields)


_EVENT_KEYS: Dict[Logger, Dict[str, Any]] = {}
"""The keys every transfer-end event of a logger has, made once per logger."""


# ---------------------------------------------------------------- --log-format json --


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)  # seconds, to the microsecond: 0.012346, not 0.012345790863037109
    if value is None or isinstance(value, (bool, int, str)):
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
    return JSONLinesObserver(log_destination(logfile, nodaemon))  # type: ignore[arg-type]


def log_destination(logfile: Optional[str], nodaemon: bool) -> Union[IO[str], LogFile]:
    """Where twistd writes its text log: stdout for `--logfile -` or -n without one, else the file (twistd.log)."""
    if logfile == "-" or (nodaemon and not logfile):
        return sys.stdout
    return LogFile.fromFullPath(logfile or "twistd.log")


# ---------------------------------------------------------------- --log-format text --

MAX_PENDING_LINES = 256
"""Transfer lines held for the end of a reactor turn at most; then they are written at once."""


@implementer(ILogObserver)
class TextLinesObserver:
    """twistd's text log, line for line, with our own transfer lines written without its per-event formatting.

    A transfer-end event carries its line ready (`log_text`, see `end_text`); Twisted's
    classic formatter would still parse its format, look up the time zone and render the
    time for each (a sixth of a small file's cost in a boot storm). Here such a line is the
    same `2026-12-02T04:06:46+0000 [tftp_offload#info] complete ...` with the time stamp
    rendered once a second, and the lines of one reactor turn written together at its end
    (or before any other event, to keep the order). Every other event (tracebacks, Twisted's
    own) goes through Twisted's observer to the same place, so the file reads as it always did.
    """

    def __init__(self, out: Union[IO[str], LogFile], clock: Optional[IReactorTime] = None) -> None:
        """`clock`: what schedules the write at the end of the reactor's turn (the reactor by default)."""
        self.out = out
        self.other = textFileLogObserver(out)  # type: ignore[arg-type]
        self._second: Optional[int] = None
        self._stamp = ""
        self._clock = clock
        self._lines: List[str] = []
        """Our lines of this reactor turn, not yet written."""

    def __call__(self, event: LogEvent) -> None:
        text = event.get("log_text")
        when = event.get("log_time")
        level = event.get("log_level")
        if (type(text) is not str or when is None or level is None or event.get("log_format") != "{log_text}"
                or "log_failure" in event or "log_system" in event):
            if self._lines:
                self.write_pending()  # in order: ours of this turn first
            self.other(event)
            return
        second = int(when)
        if second != self._second:  # a time stamp has whole seconds: the same for every event in one
            self._stamp, self._second = formatTime(second), second
        if "\n" in text:  # as Twisted continues a line (end_text makes none)
            text = text.replace("\n", "\n\t")
        lines = self._lines
        lines.append(f"{self._stamp} [{event.get('log_namespace', '-')}#{level.name}] {text}\n")
        # Written once per reactor turn, not once per line: twistd's log file is unbuffered, and a
        # boot storm's turn ends a dozen small transfers (a system call each, 5% of one's cost).
        if len(lines) == 1:
            self._schedule()
        elif len(lines) >= MAX_PENDING_LINES:
            self.write_pending()

    def _schedule(self) -> None:
        clock = self._clock
        if clock is None:
            from twisted.internet import reactor

            clock = self._clock = cast(IReactorTime, reactor)
            # Lines of the last turn before the reactor stops are written as it shuts down.
            reactor.addSystemEventTrigger("after", "shutdown", self.write_pending)  # type: ignore[attr-defined]
        clock.callLater(0, self.write_pending)

    def write_pending(self) -> None:
        """Write the lines held for this turn, now (idempotent)."""
        lines, self._lines = self._lines, []
        if lines:
            self.out.write("".join(lines))
            self.out.flush()


def twistd_observer(log_format: str, twistd: Optional[Mapping[str, Any]]) -> Optional[ILogObserver]:
    """The log observer the application gives twistd for `--log-format`, or None to leave twistd's own.

    JSON always (outside twistd it writes ./twistd.log). Text only under twistd, writing
    where twistd would (its --logfile, or stdout with -n), and not for --syslog or for
    daemon mode with `--logfile -` (twistd's own refusal stays). A log file rotates on
    SIGUSR1 as twistd's own does, when nothing else has claimed the signal.
    """
    logfile = (twistd or {}).get("logfile")
    nodaemon = bool((twistd or {}).get("nodaemon"))
    if log_format == "json":
        observer: ILogObserver = json_observer(logfile, nodaemon)
    elif twistd is None or twistd.get("syslog") or (logfile == "-" and not nodaemon):
        return None
    else:
        observer = TextLinesObserver(log_destination(logfile, nodaemon))
    out = getattr(observer, "out", None)
    if twistd is not None and isinstance(out, LogFile) and not signal.getsignal(signal.SIGUSR1):
        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(out.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return observer
