"""twistd wiring (tap.py): --listen parsing, option checks, the service tree makeService builds,
and what the options do with inherited descriptors (systemd socket activation; activation.py's
own tests are in tests/test_activation.py).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import List

import pytest
from twisted.application.service import IService, MultiService
from twisted.python import usage

from tests.support.inherit import run_child
from tftp_offload.backends.directory import DirectoryBackend
from tftp_offload.config import LOOKUP_TIMEOUT, ServerConfig, lookup_timeout_for
from tftp_offload.guard import GuardLimits
from tftp_offload.options import Limits
from tftp_offload.service import DEFAULT_LISTEN, TFTPOffloadService
from tftp_offload.tap import Options, StopInOrder, makeService, parse_listen
from tftp_offload.workers import Workers


@pytest.fixture(autouse=True)
def no_socket_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Options reads (and clears) LISTEN_* from the environment: make sure none is set here."""
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[::1]:69", ("::1", 69)),
        ("[fe80::1%eth0]:6969", ("fe80::1%eth0", 6969)),
        ("[::]:0", ("::", 0)),
        ("127.0.0.1:69", ("127.0.0.1", 69)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        (":69", ("::", 69)),
        ("69", ("::", 69)),
        ("localhost:1069", ("localhost", 1069)),
    ],
)
def test_parse_listen(text: str, expected: tuple) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "::1:69",  # IPv6 without brackets
        "fe80::1:69",
        "[::1]",  # no port
        "[::1]69",
        "[::1:69",
        "127.0.0.1:",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:tftp",
        "127.0.0.1:6 9",
        "127.0.0.1:²",  # str.isdigit() says yes, int() says no
        "",
        "port",
        "127.0.0.1",
    ],
)
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(usage.UsageError) as caught:
        parse_listen(text)
    assert "\n" not in str(caught.value)
    assert "--listen" in str(caught.value)


@pytest.mark.parametrize("text", ["foo", "127.0.0.1", "[::1]", "127.0.0.1:", "tftp.example"])
def test_parse_listen_says_the_port_is_missing(text: str) -> None:
    with pytest.raises(usage.UsageError, match="the port is missing"):
        parse_listen(text)


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_listen_repeats_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # [::]:69 may be taken here
    monkeypatch.setattr("tftp_offload.tap.check_listen", lambda wanted, reuse_port=False: None)
    assert parse("--root", str(tmp_path)).listen == list(DEFAULT_LISTEN)
    options = parse("--root", str(tmp_path), "--listen", "127.0.0.1:1069", "-l", "[::1]:1069")
    assert options.listen == [("127.0.0.1", 1069), ("::1", 1069)]
    assert options.inherited == []


@pytest.mark.parametrize(
    "args",
    [
        [],  # neither
        ["--root", "{root}", "--socket", "/run/x.sock"],  # both
        ["--root", "{root}/missing"],
        ["--socket", "/run/x.sock", "--protocol", "carrier-pigeon"],
        ["--root", "{root}", "--listen", "::1:69"],
        ["--root", "{root}", "--timeout", "5", "--give-up", "2"],
        ["--root", "{root}", "--allow", "lab"],
        ["--root", "{root}", "--allow", "192.0.2.0/33"],
    ],
    ids=["neither", "both", "missing-root", "protocol", "listen", "give-up-below-timeout", "allow-name",
         "allow-prefix"],
)
def test_option_errors(tmp_path: Path, args: List[str]) -> None:
    with pytest.raises(usage.UsageError) as caught:
        parse(*[arg.replace("{root}", str(tmp_path)) for arg in args])
    assert str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--timeout", "abc"),
        ("--timeout", "0"),
        ("--timeout", "nan"),
        ("--give-up", "-1"),
        ("--max-blksize", "7"),
        ("--max-blksize", "65465"),
        ("--max-blksize", "1e3"),
        ("--max-windowsize", "0"),
        ("--max-window-bytes", "1"),
        ("--rollover", "2"),
        ("--max-sessions", "0"),
        ("--workers", "0"),
        ("--backend-timeout", "61"),
        ("--drain-timeout", "-0.5"),
        ("--max-sessions-per-client", "-1"),
        ("--max-requests-per-second-per-client", "fast"),
        ("--port-range", "5000"),
        ("--port-range", "6000:5000"),
        ("--port-range", "0:10"),
        ("--port-range", "1:70000"),
        ("--port-range", "a:b"),
    ],
)
def test_bad_numbers_give_one_line(tmp_path: Path, option: str, value: str) -> None:
    with pytest.raises(usage.UsageError) as caught:
        parse("--root", str(tmp_path), option, value)
    message = str(caught.value)
    assert "\n" not in message
    assert option in message


def test_make_service(tmp_path: Path) -> None:
    options = parse("--root", str(tmp_path), "--listen", "127.0.0.1:0", "--max-blksize", "1400",
                    "--max-windowsize", "16", "--timeout", "0.5", "--give-up", "10", "--rollover", "1",
                    "--max-sessions", "7", "--drain-timeout", "3", "--quiet")
    top = makeService(options)
    assert IService.providedBy(top) and isinstance(top, MultiService)
    [tftp] = [child for child in top if isinstance(child, TFTPOffloadService)]
    assert isinstance(tftp.backend, DirectoryBackend)
    assert tftp.backend.root == os.path.realpath(tmp_path)
    assert tftp.listen == [("127.0.0.1", 0)]
    assert tftp.limits == Limits(max_blksize=1400, max_windowsize=16, timeout=0.5, give_up=10, rollover=1)
    assert tftp.max_sessions == 7
    assert tftp.drain_timeout == 3
    assert tftp.quiet is True
    assert tftp.port_range is None
    assert not tftp.running


def test_options_build_one_server_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """postOptions builds (and checks) the ServerConfig; makeService hands that very object to the service."""
    monkeypatch.setattr("tftp_offload.tap.check_listen", lambda wanted, reuse_port=False: None)
    options = parse("--root", str(tmp_path))
    assert options.config == ServerConfig(lookup_timeout=lookup_timeout_for(LOOKUP_TIMEOUT))
    [tftp] = [child for child in makeService(options) if isinstance(child, TFTPOffloadService)]
    assert tftp.config is options.config
    options = parse("--socket", str(tmp_path / "backend.sock"), "--backend-timeout", "2", "--log-format", "json",
                    "--single-port", "--max-sessions-per-client", "0")
    assert options.config.lookup_timeout == 3.0  # the backend client's 2 s answers first
    assert options.config.log_starts and options.config.single_port
    assert options.config.guard == GuardLimits(max_sessions_per_client=0)


def test_option_defaults_and_ranges_are_the_config_s() -> None:
    """The help's [default: X] and "From LOW to HIGH." come from ServerConfig and its Ranges."""
    defaults = Options()
    config = ServerConfig()
    assert (defaults["max-blksize"], defaults["max-windowsize"], defaults["max-window-bytes"], defaults["timeout"],
            defaults["give-up"], defaults["rollover"]) == dataclasses.astuple(config.limits)
    assert (defaults["max-sessions"], defaults["drain-timeout"]) == (config.max_sessions, config.drain_timeout)
    assert (defaults["max-sessions-per-client"], defaults["max-requests-per-second-per-client"]) == \
        (config.guard.max_sessions_per_client, config.guard.requests_per_second_per_client)
    docs = {name: getattr(coerce, "coerceDoc", None) for name, _, _, _, coerce in
            (entry + [None] * (5 - len(entry)) for entry in Options.optParameters)}
    assert docs["timeout"] == "From 0.01 to 255.0."
    assert docs["max-window-bytes"] == "From 512 to 1073741824."
    assert docs["give-up"] == "From the --timeout value to 3600."
    assert docs["workers"] == "From 1 to 64."


def test_port_range_reaches_the_service(tmp_path: Path) -> None:
    [tftp] = [child for child in makeService(parse("--root", str(tmp_path), "--port-range", "49152:49407"))
              if isinstance(child, TFTPOffloadService)]
    assert tftp.port_range == (49152, 49407)
    assert tftp.single_port is False


def test_workers_option(tmp_path: Path) -> None:
    options = parse("--root", str(tmp_path), "--workers", "3", "--listen", "127.0.0.1:0")
    assert options.argv == ["--root", str(tmp_path), "--workers", "3", "--listen", "127.0.0.1:0"]
    top = makeService(options)
    [tftp] = [child for child in top if isinstance(child, TFTPOffloadService)]
    [workers] = [child for child in top if isinstance(child, Workers)]
    assert tftp.reuse_port is True and workers.count == 3
    [tftp] = [child for child in makeService(parse("--root", str(tmp_path))) if isinstance(child, TFTPOffloadService)]
    assert tftp.reuse_port is False


def test_single_port_reaches_the_service(tmp_path: Path) -> None:
    [tftp] = [child for child in makeService(parse("--root", str(tmp_path), "--single-port"))
              if isinstance(child, TFTPOffloadService)]
    assert tftp.single_port is True


def test_make_service_with_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tftp_offload.tap.check_listen", lambda wanted, reuse_port=False: None)
    [tftp] = [child for child in makeService(parse("--root", str(tmp_path)))
              if isinstance(child, TFTPOffloadService)]
    assert tftp.listen == list(DEFAULT_LISTEN)
    assert tftp.limits == Limits(max_windowsize=64)
    assert tftp.quiet is False
    assert tftp.guard == GuardLimits()  # documented defaults: 100 sessions, 100 requests/s per client


def test_make_service_with_limits(tmp_path: Path) -> None:
    options = parse("--root", str(tmp_path), "--max-sessions-per-client", "4",
                    "--max-requests-per-second-per-client", "2.5", "--allow", "192.0.2.0/24",
                    "--allow", "2001:db8::/32", "--allow", "::ffff:198.51.100.0/120")
    [tftp] = [child for child in makeService(options) if isinstance(child, TFTPOffloadService)]
    assert tftp.guard == GuardLimits(max_sessions_per_client=4, requests_per_second_per_client=2.5,
                                     allow=(ipaddress.ip_network("192.0.2.0/24"),
                                            ipaddress.ip_network("2001:db8::/32"),
                                            ipaddress.ip_network("198.51.100.0/24")))
    assert GuardLimits().max_sessions_per_client == 100
    assert GuardLimits().requests_per_second_per_client == 100


def test_backend_stops_after_the_drain(tmp_path: Path) -> None:
    """The backend must still answer lookups while the TFTP service drains: stopped after it."""
    from twisted.application.service import Service
    from twisted.internet.defer import Deferred

    order: List[str] = []
    gate: Deferred = Deferred()

    class Recorder(Service):
        def __init__(self, name: str, wait: bool) -> None:
            self.name, self.wait = name, wait

        def stopService(self) -> object:
            order.append(self.name)
            return gate if self.wait else None

    top = StopInOrder()
    Recorder("backend", False).setServiceParent(top)
    Recorder("tftp", True).setServiceParent(top)
    top.startService()
    stopped = top.stopService()
    assert order == ["tftp"]  # the backend waits for the drain
    gate.callback(None)
    assert order == ["tftp", "backend"] and stopped.called


# ---------------------------------------------------------- socket activation --


def test_options_take_inherited_sockets_instead_of_the_default_listen() -> None:
    options, left = run_child("options")
    assert options == {"inherited": [[3, socket.AF_INET], [5, socket.AF_INET6]], "listen": []}
    assert left == []


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--root", "{root}"], "files from {root} (directory)"),
        (["--socket", "/run/example.sock"], "asking the backend on /run/example.sock (amp)"),
        (["--socket", "/run/example.sock", "--protocol", "legacy"], "asking the backend on /run/example.sock (legacy)"),
    ],
)
def test_start_up_line_names_the_backend(tmp_path: Path, args: List[str], said: str) -> None:
    from tftp_offload.service import describe

    options = parse(*[arg.replace("{root}", str(tmp_path)) for arg in args], "--listen", "127.0.0.1:0")
    [tftp] = [child for child in makeService(options) if isinstance(child, TFTPOffloadService)]
    assert describe(tftp.backend) == said.replace("{root}", os.path.realpath(tmp_path))


def test_log_format_json_gives_the_application_its_observer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # outside twistd there is no --logfile: the observer opens ./twistd.log
    from twisted.application.service import Application
    from twisted.logger import ILogObserver

    from tftp_offload.logs import JSONLinesObserver

    application = Application("tftp-offload")
    makeService(parse("--root", str(tmp_path), "--listen", "127.0.0.1:0", "--log-format", "json")) \
        .setServiceParent(application)
    assert isinstance(application.getComponent(ILogObserver), JSONLinesObserver)
    plain = Application("tftp-offload")
    makeService(parse("--root", str(tmp_path), "--listen", "127.0.0.1:0")).setServiceParent(plain)
    assert plain.getComponent(ILogObserver) is None


@pytest.mark.parametrize("nodaemon", [True, False], ids=["nodaemon", "daemon"])
def test_port_taken_after_the_check_is_still_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                      nodaemon: bool) -> None:
    """Between parsing (where --listen is checked) and the bind, another process may take the port."""
    import traceback

    from tftp_offload.startup import StartupError

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    top = makeService(parse("--root", str(tmp_path), "--listen", f"127.0.0.1:{port}"))
    top.twistd = {"nodaemon": nodaemon}  # type: ignore[attr-defined]  # as twistd's own options say
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", port))
        if nodaemon:
            with pytest.raises(SystemExit) as exited:
                top.startService()
            assert exited.value.code == 1
            assert capfd.readouterr().err == (
                f"tftp-offload: --listen 127.0.0.1:{port}: UDP port {port} on 127.0.0.1 is already in use (another "
                f"TFTP server? see ss -ulpn 'sport = :{port}'): stop it, or choose another --listen\n")
        else:
            with pytest.raises(StartupError) as caught:
                top.startService()
            # What twistd hands the waiting parent: the first 100 bytes of this line.
            line = "1 " + traceback.format_exception_only(StartupError, caught.value)[-1].strip()
            assert len(line) <= 100 and line.endswith(f"127.0.0.1:{port}: Address already in use; see the log"), line
def test_metrics_option(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--root", str(tmp_path), "--metrics", "127.0.0.1:9469"])
    assert options["metrics"] == ("127.0.0.1", 9469)
    top = makeService(options)
    from tftp_offload.metrics import MetricsService

    metrics = [s for s in top if isinstance(s, MetricsService)]  # type: ignore[attr-defined]
    assert len(metrics) == 1 and metrics[0].address == ("127.0.0.1", 9469)
    options = Options()
    options.parseOptions(["--root", str(tmp_path)])
    assert not any(isinstance(s, MetricsService) for s in makeService(options))  # type: ignore[attr-defined]


def test_metrics_bad_address_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError) as caught:
        Options().parseOptions(["--root", str(tmp_path), "--metrics", "localhost:http"])
    assert str(caught.value) == "--metrics 'localhost:http': port must be a number from 0 to 65535"


def test_metrics_without_the_library_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    with pytest.raises(usage.UsageError) as caught:
        Options().parseOptions(["--root", str(tmp_path), "--metrics", "127.0.0.1:9469"])
    assert str(caught.value) == ("--metrics needs the prometheus-client library: pip install 'tftp-offload[metrics]' "
                                 "(Debian: apt install python3-prometheus-client)")
    Options().parseOptions(["--root", str(tmp_path)])  # without --metrics nothing needs it


def test_workers_refused_with_inherited_sockets() -> None:
    [message, _left] = run_child("workers")
    assert "--workers" in message and "systemd" in message


def test_metrics_with_workers_is_refused(tmp_path: Path) -> None:
    """Each worker keeps its own counters: one endpoint would show a fraction of the transfers."""
    with pytest.raises(usage.UsageError) as caught:
        Options().parseOptions(["--root", str(tmp_path), "--listen", "127.0.0.1:0", "--workers", "2",
                                "--metrics", "127.0.0.1:0"])
    assert str(caught.value) == "--metrics counts the transfers of one process: it cannot be used with --workers"
