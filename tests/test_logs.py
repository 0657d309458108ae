"""What the log says, on a real twistd: readable lines, structured fields, JSON for jq, and the
grep recipes docs/operations.md gives, run against real output.

All traffic goes to 127.0.0.1 and ::1. Each client uses a socket of its own, so the test knows
the client address a line must name.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
from twisted.internet.task import Clock

from tests.support import tftp_client
from tests.support.harness import REPO, StartServer, TwistdServer
from tftp_offload import logs

HELLO = b"Hello from tftp-offload\n"  # tests/harness.py SMALL_FILES["hello.txt"]
OPERATIONS = REPO / "docs" / "operations.md"


# ------------------------------------------------------------------------- pure --


def test_address() -> None:
    assert logs.address("127.0.0.1", 43442) == "127.0.0.1:43442"
    assert logs.address("::1", 43442) == "[::1]:43442"
    assert logs.address("fe80::1%2", 69) == "[fe80::1%2]:69"


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        (b"pxelinux.cfg/default", "pxelinux.cfg/default"),
        (b"caf\xc3\xa9.cfg", "café.cfg"),  # UTF-8 stays text
        (b"bad\xff\xfe", "bad\\xff\\xfe"),  # other bytes escaped
        (b"two\nlines\r\t", "two\\nlines\\r\\t"),  # a name cannot break a log line
        (b"grub\\grub.cfg", "grub\\grub.cfg"),  # DOS separators as they came
    ],
)
def test_filename(name: bytes, shown: str) -> None:
    assert logs.filename(name) == shown


def test_json_fields_are_plain() -> None:
    from twisted.logger import LogLevel

    line = logs.event_as_json({"log_format": "{outcome} {file}", "log_level": LogLevel.warn, "log_time": 0.5,
                               "log_namespace": "tftp_offload", "outcome": "complete", "file": "a", "raw": b"\xff",
                               "pair": ("::1", 69), "log_logger": object(), "duration": 0.012345790863037109})
    assert json.loads(line) == {"time": "1970-01-01T00:00:00.500Z", "level": "warn", "namespace": "tftp_offload",
                                "text": "complete a", "outcome": "complete", "file": "a", "raw": "\\xff",
                                "pair": ["::1", 69], "duration": 0.012346}  # seconds, to the microsecond


END_FIELDS = {"file": "pxelinux.cfg/default", "client": "192.0.2.7:2070", "kind": "directory", "size": 1024,
              "blksize": 1468, "windowsize": 1, "bytes": 1024, "duration": 0.0123456, "retransmits": 0,
              "error_code": None, "error_message": None, "error_by": None}
"""A transfer-end event's fields (`Session.fields`) that `end_text` reads; each case below changes some."""


@pytest.mark.parametrize(
    ("changed", "text"),
    [
        ({"outcome": "complete"},
         "complete pxelinux.cfg/default to 192.0.2.7:2070: 1024 bytes in 0.012s "
         "(directory, blksize 1468, windowsize 1)"),
        ({"outcome": "complete", "kind": None, "retransmits": 3, "windowsize": 16},
         "complete pxelinux.cfg/default to 192.0.2.7:2070: 1024 bytes in 0.012s "
         "(blksize 1468, windowsize 16, 3 retransmitted)"),
        ({"outcome": "complete", "retransmits": 1},
         "complete pxelinux.cfg/default to 192.0.2.7:2070: 1024 bytes in 0.012s "
         "(directory, blksize 1468, windowsize 1, 1 retransmitted)"),
        ({"outcome": "complete", "size": None, "duration": 2.0},  # a stream: no size, the same line
         "complete pxelinux.cfg/default to 192.0.2.7:2070: 1024 bytes in 2.000s "
         "(directory, blksize 1468, windowsize 1)"),
        ({"outcome": "timeout", "bytes": 512, "duration": 5.0, "blksize": 512, "retransmits": 2},
         "timeout pxelinux.cfg/default to 192.0.2.7:2070: 512 bytes of 1024 in 5.000s "
         "(directory, blksize 512, windowsize 1, 2 retransmitted)"),
        ({"outcome": "timeout", "bytes": 512, "size": None, "kind": None},
         "timeout pxelinux.cfg/default to 192.0.2.7:2070: 512 bytes in 0.012s (blksize 1468, windowsize 1)"),
        ({"outcome": "aborted", "size": None, "error_code": 0, "error_message": "Server shutting down",
          "error_by": "server"},
         "aborted pxelinux.cfg/default to 192.0.2.7:2070: 1024 bytes in 0.012s "
         "(directory, blksize 1468, windowsize 1); sent ERROR 0: Server shutting down"),
        ({"outcome": "aborted", "blksize": None, "windowsize": None, "bytes": 0, "error_code": 0,
          "error_message": "Internal server error", "error_by": "server"},  # before the transfer began
         "aborted pxelinux.cfg/default to 192.0.2.7:2070: 0 bytes of 1024 in 0.012s (directory); "
         "sent ERROR 0: Internal server error"),
        ({"outcome": "aborted", "blksize": None, "windowsize": None, "bytes": 0, "kind": None},
         "aborted pxelinux.cfg/default to 192.0.2.7:2070: 0 bytes of 1024 in 0.012s"),
        ({"outcome": "client-error", "bytes": 512, "error_code": 0, "error_message": "user abort",
          "error_by": "client"},
         "client-error pxelinux.cfg/default to 192.0.2.7:2070: 512 bytes of 1024 in 0.012s "
         "(directory, blksize 1468, windowsize 1); the client said ERROR 0: user abort"),
        ({"outcome": "protocol-error", "bytes": 0, "error_code": 4, "error_message": "Expected an ACK",
          "error_by": "server"},
         "protocol-error pxelinux.cfg/default to 192.0.2.7:2070: 0 bytes of 1024 in 0.012s "
         "(directory, blksize 1468, windowsize 1); sent ERROR 4: Expected an ACK"),
        ({"outcome": "probe", "bytes": 0, "error_code": 8, "error_message": "size only", "error_by": "client"},
         "probe pxelinux.cfg/default to 192.0.2.7:2070: told the size, 1024 bytes, in 0.012s "
         "(directory, blksize 1468, windowsize 1); the client said ERROR 8: size only"),
        ({"outcome": "refused", "kind": None, "size": None, "blksize": None, "windowsize": None, "bytes": 0,
          "error_code": 1, "error_message": "File not found", "error_by": "server"},
         "refused pxelinux.cfg/default to 192.0.2.7:2070: File not found (ERROR 1)"),
    ],
)
def test_end_text(changed: Dict[str, Any], text: str) -> None:
    """Every outcome's line, and the usual one (complete, no retransmission) made in one piece reads
    as the rest: what an operator wants first, details in brackets, an ERROR last."""
    assert logs.end_text({**END_FIELDS, **changed}) == text


def test_text_observer_writes_what_twistd_would() -> None:
    """Our transfer lines, other events, tracebacks: the same text as twistd's own observer, in order."""
    import io

    from twisted.logger import LogLevel, textFileLogObserver
    from twisted.python.failure import Failure

    try:
        raise ValueError("boom")
    except ValueError:
        failure = Failure()
    ours, theirs = io.StringIO(), io.StringIO()
    clock = Clock()
    observer, twisted = logs.TextLinesObserver(ours, clock), textFileLogObserver(theirs)
    common = {"log_namespace": "tftp_offload", "log_level": LogLevel.info, "log_format": "{log_text}"}
    events = [
        {**common, "log_time": 1.25, "log_text": "complete a to 192.0.2.1:1: 1 bytes in 0.001s", "file": "a"},
        {**common, "log_time": 1.75, "log_text": "complete b to 192.0.2.1:2: 2 bytes in 0.001s"},  # same second
        {**common, "log_time": 3600.5, "log_text": "two\nlines", "log_level": LogLevel.warn},  # next hour
        {**common, "log_time": 3600.6, "log_format": "Serving {n}", "n": 2},  # not ours: Twisted formats it
        {**common, "log_time": 3600.7, "log_text": "with a traceback", "log_failure": failure},
        {**common, "log_time": 3600.8, "log_text": "from a system", "log_system": "UDP"},
        {**common, "log_time": 86400.0, "log_text": "the last"},
    ]
    for event in events:
        observer(dict(event))
        twisted(dict(event))
    clock.advance(0)  # the end of the reactor's turn: our last line is written
    assert ours.getvalue() == theirs.getvalue()
    assert ours.getvalue().count("\n") >= len(events)


def test_text_observer_writes_a_turns_lines_at_its_end() -> None:
    """One write per reactor turn, not per transfer line; another event first writes what is held."""
    from twisted.logger import LogLevel

    class Out:
        def __init__(self) -> None:
            self.writes: List[str] = []

        def write(self, text: str) -> None:
            self.writes.append(text)

        def flush(self) -> None:
            pass

    out, clock = Out(), Clock()
    observer = logs.TextLinesObserver(out, clock)  # type: ignore[arg-type]
    common = {"log_namespace": "tftp_offload", "log_level": LogLevel.info, "log_format": "{log_text}",
              "log_time": 1.0}
    for name in ("a", "b", "c"):
        observer({**common, "log_text": f"complete {name}"})
    assert out.writes == []
    clock.advance(0)
    assert len(out.writes) == 1 and out.writes[0].count("\n") == 3 and out.writes[0].endswith("complete c\n")
    observer({**common, "log_text": "complete d"})
    observer({**common, "log_format": "Serving {n}", "n": 2})  # Twisted's: ours go first
    assert "complete d" in out.writes[1] and "Serving 2" in "".join(out.writes[2:])
    clock.advance(0)
    assert not any("complete d" in w for w in out.writes[2:])  # written once
    for i in range(logs.MAX_PENDING_LINES):  # a turn that ends very many: written as they reach the cap
        observer({**common, "log_text": f"complete {i}"})
    assert "".join(out.writes).count("complete") == 4 + logs.MAX_PENDING_LINES


def test_transfer_end_is_the_event_logger_info_makes() -> None:
    from twisted.logger import Logger

    fields = {**END_FIELDS, "outcome": "complete", "file": "a", "client": "192.0.2.1:1", "bytes": 1,
              "duration": 0.001, "blksize": None, "size": 1}
    seen: List[Dict[str, Any]] = []
    log = Logger(namespace="tftp_offload", observer=seen.append)
    log.info("{log_text}", log_text=logs.end_text(fields), **fields, event="transfer-end")
    logs.transfer_end(log, dict(fields))
    first, second = seen
    assert second.pop("log_time") >= first.pop("log_time")
    assert second == first


def test_twistd_gets_our_text_observer_where_it_would_write(tmp_path: Path) -> None:
    import signal
    import sys

    from twisted.python.logfile import LogFile

    previous = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        to_file = logs.twistd_observer("text", {"logfile": str(tmp_path / "x.log"), "nodaemon": False})
        assert isinstance(to_file, logs.TextLinesObserver) and isinstance(to_file.out, LogFile)
        assert to_file.out.path == str(tmp_path / "x.log")
        assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)  # it rotates as twistd's would
        to_stdout = logs.twistd_observer("text", {"logfile": None, "nodaemon": True})
        assert isinstance(to_stdout, logs.TextLinesObserver) and to_stdout.out is sys.stdout
        assert isinstance(logs.twistd_observer("json", {"logfile": "-", "nodaemon": True}), logs.JSONLinesObserver)
        # twistd's own: outside twistd, to syslog, and its refusal of a daemon logging to stdout.
        for twistd in (None, {"syslog": True, "nodaemon": True}, {"logfile": "-", "nodaemon": False}):
            assert logs.twistd_observer("text", twistd) is None
    finally:
        signal.signal(signal.SIGUSR1, previous)


# ------------------------------------------------------------------ clients --

Client = Tuple[str, int]


def shown(client: Client) -> str:
    return logs.address(*client)


def fetch_hello(host: str, port: int) -> Client:
    """hello.txt, lock-step, no options: one DATA, one ACK."""
    with tftp_client.udp_socket(host) as sock:
        sock.settimeout(5)
        sock.sendto(tftp_client.rrq(b"hello.txt"), (host, port))
        data, peer = sock.recvfrom(70000)
        assert data == b"\0\3\0\1" + HELLO, data
        sock.sendto(tftp_client.ack(1), peer)
        return sock.getsockname()[0], sock.getsockname()[1]


def fetch_missing(host: str, port: int) -> Client:
    with tftp_client.udp_socket(host) as sock:
        sock.settimeout(5)
        sock.sendto(tftp_client.rrq(b"no-such-file"), (host, port))
        data, _ = sock.recvfrom(70000)
        assert tftp_client.parse_error(data) == (1, "File not found"), data
        return sock.getsockname()[0], sock.getsockname()[1]


def abort_after_one_block(host: str, port: int) -> Client:
    with tftp_client.udp_socket(host) as sock:
        sock.settimeout(5)
        sock.sendto(tftp_client.rrq(b"1m.bin"), (host, port))
        data, peer = sock.recvfrom(70000)
        assert data[:4] == b"\0\3\0\1", data[:4]
        sock.sendto(tftp_client.ack(1), peer)
        sock.recvfrom(70000)  # block 2: one block (512 bytes) was acknowledged
        sock.sendto(tftp_client.error(0, b"user abort"), peer)
        return sock.getsockname()[0], sock.getsockname()[1]


def probe_then_fetch(host: str, port: int, wait: float = 0.5) -> Tuple[Client, float]:
    """The UEFI way: RRQ with tsize 0, the OACK, ERROR 8, and at once the same RRQ from the same port.

    Returns the client address and how long the follow-up waited for its first answer; the
    follow-up is never resent, so an answer within `wait` means it was served at once."""
    request = tftp_client.rrq(b"1k.bin", options={"tsize": "0", "blksize": "1468"})
    with tftp_client.udp_socket(host) as sock:
        sock.settimeout(5)
        sock.sendto(request, (host, port))
        oack, peer = sock.recvfrom(70000)
        assert tftp_client.parse_oack(oack) == {"tsize": "1024", "blksize": "1468"}, oack
        sock.sendto(tftp_client.error(8, b"size only"), peer)
        sock.sendto(request, (host, port))  # no gap
        sent = time.monotonic()
        sock.settimeout(wait)
        try:
            answer, peer = sock.recvfrom(70000)
        except socket.timeout:
            return (sock.getsockname()[0], sock.getsockname()[1]), float("inf")
        waited = time.monotonic() - sent
        assert tftp_client.opcode_of(answer) == tftp_client.OACK, answer
        sock.sendto(tftp_client.ack(0), peer)
        data, _ = sock.recvfrom(70000)
        assert len(data) == 4 + 1024
        sock.sendto(tftp_client.ack(1), peer)
        return (sock.getsockname()[0], sock.getsockname()[1]), waited


def wait_for(server: TwistdServer, predicate: Callable[[str], bool], what: str, timeout: float = 10) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        log = server.log()
        if predicate(log):
            return log
        time.sleep(0.05)
    raise AssertionError(f"the log never showed {what}:\n{server.log()[-4000:]}")


def line_for(log: str, client: Client) -> str:
    [line] = [line for line in log.splitlines() if f" to {shown(client)}" in line]
    return line


# ------------------------------------------------------------------- as text --


@pytest.fixture(scope="module")
def text_server(twistd_factory: StartServer) -> TwistdServer:
    return twistd_factory()


def test_end_lines_as_text(text_server: TwistdServer) -> None:
    port = text_server.port
    ok, missing = fetch_hello("127.0.0.1", port), fetch_missing("::1", port)
    aborted = abort_after_one_block("127.0.0.1", port)
    log = wait_for(text_server, lambda log: all(f" to {shown(c)}" in log for c in (ok, missing, aborted)),
                   "three end lines")
    stamp = r"^\S+ \[tftp_offload#info\] "
    assert re.match(stamp + re.escape(f"complete hello.txt to 127.0.0.1:{ok[1]}: 24 bytes in ") + r"\d+\.\d{3}s "
                    + re.escape("(directory, blksize 512, windowsize 1)") + "$", line_for(log, ok)), line_for(log, ok)
    assert re.match(stamp + re.escape(f"refused no-such-file to [::1]:{missing[1]}: File not found (ERROR 1)") + "$",
                    line_for(log, missing)), line_for(log, missing)
    assert re.match(stamp + re.escape(f"client-error 1m.bin to 127.0.0.1:{aborted[1]}: 512 bytes of 1048576 in ")
                    + r"\d+\.\d{3}s "
                    + re.escape("(directory, blksize 512, windowsize 1); the client said ERROR 0: user abort")
                    + "$", line_for(log, aborted)), line_for(log, aborted)
    for python_repr in ("b'", "('127.0.0.1'", "('::1'"):
        assert python_repr not in log


def test_size_probe_is_one_probe_line_and_its_follow_up_is_served_at_once(text_server: TwistdServer) -> None:
    """Ten probes, each followed with no gap by the real request from the same port: every follow-up
    is answered at once (none waits for the client's retry), and each shows as probe then complete."""
    before = len(text_server.log().splitlines())
    results = [probe_then_fetch(host, text_server.port) for host in ("127.0.0.1", "::1") * 6]
    late = [waited for _, waited in results if waited >= 0.5]
    assert not late, f"{len(late)} of {len(results)} follow-ups were not served at once"
    # The kernel may give two of these clients, one after the other, the same port: pairs per port.
    counts = Counter(client for client, _ in results)

    def lines_of(log: str, client: Tuple[str, int]) -> List[str]:
        # This test's lines only, and "ADDR:PORT:" whole: port 4344 must not match 43442.
        return [line for line in log.splitlines()[before:] if f" to {shown(client)}: " in line]

    log = wait_for(text_server, lambda log: all(sum(" complete 1k.bin " in line for line in lines_of(log, c)) == n
                                                for c, n in counts.items()), "every follow-up complete")
    for client, n in counts.items():
        lines = lines_of(log, client)
        assert len(lines) == 2 * n, lines
        for probe, complete in zip(lines[0::2], lines[1::2]):
            assert_probe_then_complete(probe, complete, client)


def assert_probe_then_complete(probe: str, complete: str, client: Tuple[str, int]) -> None:
    assert re.search(re.escape(f"] probe 1k.bin to {shown(client)}: told the size, 1024 bytes, in ")
                     + r"\d+\.\d{3}s"
                     + re.escape(" (directory, blksize 1468, windowsize 1); the client said ERROR 8: size only")
                     + "$",
                     probe), probe
    assert f"] complete 1k.bin to {shown(client)}: 1024 bytes" in complete


def test_a_refusal_to_tftp_hpa_is_one_line(text_server: TwistdServer, tmp_path: Any) -> None:
    """tftp-hpa acknowledges the ERROR it gets at the request port: that is normal, not a line."""
    before = len(text_server.log().splitlines())
    subprocess.run(["tftp", "127.0.0.1", str(text_server.port), "-c", "get", "no-such-hpa", str(tmp_path / "x")],
                   capture_output=True, timeout=30, check=False)
    time.sleep(0.5)
    new = text_server.log().splitlines()[before:]
    assert len(new) == 1 and "] refused no-such-hpa to 127.0.0.1:" in new[0], new


def test_start_up_line_names_the_backend(text_server: TwistdServer) -> None:
    log = text_server.log()
    for host in text_server.hosts:
        assert f"Serving TFTP on {logs.address(host, text_server.port)}: files from {text_server.root} (directory)" \
            in log, log


def test_quiet_keeps_only_what_went_wrong(twistd_factory: StartServer) -> None:
    server = twistd_factory("--quiet")
    ok, missing = fetch_hello("127.0.0.1", server.port), fetch_missing("127.0.0.1", server.port)
    probed, _ = probe_then_fetch("127.0.0.1", server.port)
    log = wait_for(server, lambda log: f" to {shown(missing)}" in log, "the refusal")
    time.sleep(0.3)
    log = server.log()
    assert f" to {shown(ok)}" not in log and f" to {shown(probed)}" not in log, log


# ------------------------------------------------------------------- as JSON --


@pytest.fixture(scope="module")
def json_server(twistd_factory: StartServer) -> TwistdServer:
    return twistd_factory("--log-format", "json")


def json_events(server: TwistdServer) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in server.log().splitlines()]  # every line is one JSON object


def ends(server: TwistdServer, client: Client) -> List[Dict[str, Any]]:
    return [e for e in json_events(server) if e.get("event") == "transfer-end" and e.get("client") == shown(client)]


def test_end_events_as_json(json_server: TwistdServer) -> None:
    port = json_server.port
    ok, missing, aborted = (fetch_hello("127.0.0.1", port), fetch_missing("::1", port),
                            abort_after_one_block("::1", port))
    wait_for(json_server, lambda log: all(ends(json_server, c) for c in (ok, missing, aborted)), "three end events")
    common = {"level": "info", "namespace": "tftp_offload", "event": "transfer-end", "kind": "directory"}
    [event] = ends(json_server, ok)
    assert event.pop("duration") >= 0 and event.pop("time").endswith("Z")
    assert event == {**common, "text": event["text"], "outcome": "complete", "file": "hello.txt",
                     "client": shown(ok), "client_host": "127.0.0.1", "client_port": ok[1], "local": "127.0.0.1",
                     "local_port": port, "size": 24, "bytes": 24, "blksize": 512, "windowsize": 1, "retransmits": 0,
                     "error_code": None, "error_message": None, "error_by": None}
    assert event["text"].startswith(f"complete hello.txt to 127.0.0.1:{ok[1]}: 24 bytes in ")
    [event] = ends(json_server, missing)
    assert {k: event[k] for k in ("outcome", "file", "client_host", "client_port", "local", "bytes", "size",
                                  "error_code", "error_message", "error_by")} == {
        "outcome": "refused", "file": "no-such-file", "client_host": "::1", "client_port": missing[1], "local": "::1",
        "bytes": 0, "size": None, "error_code": 1, "error_message": "File not found", "error_by": "server"}
    [event] = ends(json_server, aborted)
    assert {k: event[k] for k in ("outcome", "file", "bytes", "size", "error_code", "error_message", "error_by")} == {
        "outcome": "client-error", "file": "1m.bin", "bytes": 512, "size": 1048576, "error_code": 0,
        "error_message": "user abort", "error_by": "client"}
    [start] = [e for e in json_events(json_server) if e.get("event") == "transfer-start" and e["client"] == shown(ok)]
    assert {k: start[k] for k in ("file", "size", "blksize", "windowsize", "local_port")} == {
        "file": "hello.txt", "size": 24, "blksize": 512, "windowsize": 1, "local_port": port}


def test_jq_reads_the_log(json_server: TwistdServer) -> None:
    """The query README and docs/operations.md show, run by jq itself on the real log file."""
    jq = shutil.which("jq")
    if jq is None:
        pytest.fail("jq is not installed: run scripts/setup")
    missing = fetch_missing("127.0.0.1", json_server.port)
    wait_for(json_server, lambda log: ends(json_server, missing), "the refusal")
    query = documented_jq_query()
    done = subprocess.run([jq, "-c", query, str(json_server.log_path)], capture_output=True, text=True, timeout=30,
                          check=True)
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert {"outcome": "refused", "file": "no-such-file", "client": shown(missing), "error": "File not found"} in rows
    assert all(row["outcome"] not in ("complete", "probe") for row in rows), rows


def documented_jq_query() -> str:
    text = OPERATIONS.read_text()
    found = re.findall(r"jq -c '([^']+)' ", text)
    assert found, "docs/operations.md shows no jq query"
    assert found[0] in (REPO / "README.md").read_text(), "README shows another jq query than docs/operations.md"
    return found[0]


# -------------------------------------------------------------- grep recipes --


def recipes() -> Dict[str, str]:
    """The `--grep 'PATTERN'` recipes of docs/operations.md, by the comment that ends each line."""
    found = re.findall(r"--grep '([^']+)'\s+# (.+)", OPERATIONS.read_text())
    return {comment.strip(): pattern for pattern, comment in found}


def test_grep_recipes_match_what_is_written(twistd_factory: StartServer) -> None:
    server = twistd_factory("--give-up", "1", "--timeout", "0.2")
    port = server.port
    ok, missing, aborted = fetch_hello("127.0.0.1", port), fetch_missing("127.0.0.1", port), \
        abort_after_one_block("::1", port)
    probed, _ = probe_then_fetch("::1", port)
    with tftp_client.udp_socket("::1") as sock:  # asks, then never answers: a timeout
        sock.sendto(tftp_client.rrq(b"1m.bin"), ("::1", port))
        stalled = (sock.getsockname()[0], sock.getsockname()[1])
        log = wait_for(server, lambda log: f" to {shown(stalled)}" in log, "the timeout", timeout=15)
    lines = [line for line in log.splitlines() if "[tftp_offload#" in line]
    by = {name: [line for line in lines if f" to {shown(c)}" in line]
          for name, c in {"ok": ok, "missing": missing, "aborted": aborted, "probed": probed,
                          "stalled": stalled}.items()}
    assert [line.split("] ")[1].split()[0] for line in by["stalled"]] == ["timeout"], by["stalled"]
    # The lines of these requests, the start-up lines and any warning (not the readiness probes' fetches).
    lines = [line for line in lines if any(line in group for group in by.values()) or " to " not in line]
    found = recipes()
    assert set(found) >= {"this boot's trouble", "UEFI size probes", "one machine (by address)"}, found

    def grep(pattern: str) -> List[str]:
        return [line for line in lines if re.search(pattern, line)]

    trouble = grep(found["this boot's trouble"])
    assert set(trouble) == set(by["missing"] + by["aborted"] + by["stalled"]), trouble
    probes = grep(found["UEFI size probes"])
    assert probes == [line for line in by["probed"] if "] probe " in line] and len(probes) == 1, probes
    machine = grep(found["one machine (by address)"].replace(r"192\.0\.2\.77", r"127\.0\.0\.1"))
    assert set(machine) == set(by["ok"] + by["missing"]), machine


def test_trouble_recipe_finds_a_backend_failure() -> None:
    """docs/operations.md: an unexpected backend failure is logged at critical, and the first recipe finds it."""
    import io

    from twisted.logger import Logger
    from twisted.python.failure import Failure

    out = io.StringIO()
    log = Logger(namespace="tftp_offload", observer=logs.TextLinesObserver(out))
    try:
        raise RuntimeError("the backend broke")
    except RuntimeError:
        log.failure("Backend failed on {file} for {client}", failure=Failure(), file="pxelinux.0",
                    client="192.0.2.7:2000", event="backend-error")
    first, *rest = out.getvalue().splitlines()
    assert re.search(recipes()["this boot's trouble"], first), first
    assert "Backend failed on pxelinux.0 for 192.0.2.7:2000" in first and rest, out.getvalue()


# -------------------------------------------------------------------- rotation --


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_sigusr1_rotates_the_log_file(twistd_factory: StartServer, log_format: str) -> None:
    """As twistd's own log file does: the old lines move to twistd.log.1, new ones go to a new twistd.log."""
    import os
    import signal

    server = twistd_factory("--log-format", log_format)
    before = fetch_hello("127.0.0.1", server.port)
    ended = f" to {shown(before)}: " if log_format == "text" else f'"client": "{shown(before)}"'
    wait_for(server, lambda log: any(ended in line and "transfer-start" not in line for line in log.splitlines()),
             "the first transfer's end")
    os.kill(server.pid, signal.SIGUSR1)
    rotated = server.log_path.parent / (server.log_path.name + ".1")
    wait_for(server, lambda log: rotated.exists(), "twistd.log.1")
    after = fetch_hello("127.0.0.1", server.port)
    wait_for(server, lambda log: shown(after) in server.log_path.read_text(), "the next transfer in the new file")
    assert shown(before) in rotated.read_text() and shown(before) not in server.log_path.read_text()
