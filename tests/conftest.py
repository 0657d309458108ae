"""Shared fixtures: test files, free ports, and a real `twistd -n tftp-offload` process.

Nothing here imports the reactor (or anything that does) at module level: pytest-twisted
installs the reactor chosen with `--reactor` only after conftest is imported, and the
asyncio reactor cannot be installed once another one is.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import pytest

from tests.support.harness import (
    BIG_FILE,
    BIG_SIZE,
    HOSTS,
    REPO,
    SMALL_FILES,
    MiB,
    StartServer,
    TwistdServer,
    free_udp_port,
    listen_arg,
    twistd_command,
    wait_until_serving,
)

# ---------------------------------------------------------------- files --


@pytest.fixture(scope="session")
def tftp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A served root: hello.txt, 1k.bin (1 KiB random), 1m.bin (1 MiB random), a subfolder,
    and symlinks that point out of the root (`escape` to /etc/passwd, `escape-dir` to /etc).
    The 100 MiB file is added only when a test asks for `big_file`."""
    root = tmp_path_factory.mktemp("root")
    for name, content in SMALL_FILES.items():
        (root / name).write_bytes(content if isinstance(content, bytes) else os.urandom(content))
    (root / "sub").mkdir()
    (root / "sub" / "inner.bin").write_bytes(os.urandom(3000))
    (root / "escape").symlink_to("/etc/passwd")
    (root / "escape-dir").symlink_to("/etc")
    return root


@pytest.fixture(scope="session")
def big_file(tftp_root: Path) -> Path:
    """100 MiB of random bytes in the served root, written once per session in 1 MiB chunks."""
    path = tftp_root / BIG_FILE
    if not path.exists() or path.stat().st_size != BIG_SIZE:
        tmp = path.with_suffix(".part")
        with tmp.open("wb") as f:
            for _ in range(BIG_SIZE // MiB):
                f.write(os.urandom(MiB))
        tmp.rename(path)
    return path


@pytest.fixture
def udp_port() -> int:
    """A UDP port free on both 127.0.0.1 and ::1."""
    return free_udp_port()


@pytest.fixture
def udp_port_v4() -> int:
    return free_udp_port(("127.0.0.1",))


@pytest.fixture
def udp_port_v6() -> int:
    return free_udp_port(("::1",))


@pytest.fixture(scope="module")
def twistd_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tftp_root: Path
) -> Iterator[StartServer]:
    """start(*extra_args, hosts=HOSTS, root=tftp_root, ready=None) -> a serving TwistdServer.

    The server runs under the reactor pytest runs with (`--reactor asyncio` is passed on to
    twistd). Every server started is stopped (SIGTERM to its PID) when the module is done,
    and its log must then hold no traceback.
    """
    reactor = str(request.config.getoption("reactor", "default"))
    started: List[TwistdServer] = []

    def start(
        *extra: str, hosts: Sequence[str] = HOSTS, root: Optional[Path] = None, ready: Optional[Sequence[str]] = None
    ) -> TwistdServer:
        """`hosts`: addresses to listen on (one port for all); `ready`: loopback addresses to probe
        until it answers (default `hosts`; give them when listening on a wildcard address)."""
        served = root or tftp_root
        port = free_udp_port(hosts)
        workdir = tmp_path_factory.mktemp("twistd")
        log_path = workdir / "twistd.log"
        args = ["--root", str(served)]
        for host in hosts:
            args += ["--listen", listen_arg(host, port)]
        args += list(extra)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        cmd = twistd_command(args, log_path, workdir / "twistd.pid", reactor)
        with (workdir / "stdout").open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        server = TwistdServer(list(ready or hosts), port, served, log_path, proc, cmd)
        started.append(server)
        try:
            wait_until_serving(server)
        except AssertionError as e:
            stdout = (workdir / "stdout").read_text(errors="replace")[-4000:]
            raise AssertionError(f"{e}\ncommand: {cmd}\nstdout/stderr:\n{stdout}") from None
        return server

    yield start

    problems = []
    for server in started:
        try:
            server.stop()
        except AssertionError as e:
            problems.append(str(e))
        if "Traceback" in server.log():
            problems.append(f"traceback in {server.log_path}:\n{server.log()[-8000:]}")
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def _shared_server(twistd_factory: StartServer) -> TwistdServer:
    return twistd_factory()


@pytest.fixture
def twistd_server(_shared_server: TwistdServer) -> Iterator[TwistdServer]:
    """A real twistd process serving `tftp_root` on 127.0.0.1 and ::1 (one port, shared by a
    module's tests); after each test it must still run and its log hold no traceback."""
    _shared_server.assert_healthy()
    yield _shared_server
    _shared_server.assert_healthy()


@pytest.fixture
def reactor_name(request: pytest.FixtureRequest) -> str:
    """The reactor this run uses (pytest-twisted's --reactor): twistd processes a test starts use it too."""
    return str(request.config.getoption("reactor", "default"))
