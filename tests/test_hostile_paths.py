"""The hostile-path corpus (`hostile_paths`) against every backend, and through the wire.

Directly against the directory backend, then over real UDP through the server with each
backend: the directory, AMP to a responder wrapping a directory, AMP to the reference backend,
and the legacy backend to the rackd stand-in. Nothing outside the root is served, no error text
names a server path, a FIFO or a device never blocks the reactor (each request is answered
within a second, and a plain file is served afterwards), and no descriptor is left open.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import pytest_twisted

from tests.support import legacy_responder
from tests.support.hostile_paths import INSIDE, build, check, corpus
from tests.support.inprocess import Serving, download, get_reactor, serve, until  # noqa: F401  (fixture)
from tests.support.offload_support import open_fds, short_dir, turn
from tftp_offload.backends.directory import DirectoryBackend
from tftp_offload.errors import AccessViolation, error_for
from tftp_offload.guard import GuardLimits
from tftp_offload.offload.client import AMPBackend
from tftp_offload.offload.legacy import LegacyBackend
from tftp_offload.offload.service import offload_service
from tftp_offload.reference import ReferenceBackend

TRIED: Dict[str, int] = {}
"""Names tried per backend, printed at the end of the module (run with -s to see them)."""

LEGACY_SKIPS = (b"escape", b"escape-dir", b"sub/relative-escape")
"""rackd follows symlinks in its tree (MAAS's boot resources are symlinks into a cache), as MAAS
does: what a link in rackd's tree points at is rackd's decision, not ours."""


@pytest.fixture
def tree(tmp_path: Path) -> Tuple[Path, Path]:
    return build(tmp_path)


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print("\nhostile paths tried:", ", ".join(f"{k} {v}" for k, v in TRIED.items()),
          f"(total {sum(TRIED.values())})")


def test_directory_backend_directly(tree: Tuple[Path, Path]) -> None:
    root, outside = tree
    backend = DirectoryBackend(str(root))
    names = corpus(outside, wire=False)
    problems: List[str] = []
    before = open_fds()
    for name in names:
        started = time.monotonic()
        served: Optional[bytes] = None
        error: Optional[Tuple[int, str]] = None
        try:
            reader = backend.get_reader(name)
        except Exception as e:
            code, message, _ = error_for(e)
            error = (int(code), message)
        else:
            try:
                served = reader.read(1 << 20)
            finally:
                reader.finish()
        assert time.monotonic() - started < 1.0, f"{name!r} took too long"
        problem = check(name, served, error, root)
        if problem:
            problems.append(problem)
    assert not problems, "\n".join(problems)
    assert open_fds() == before
    TRIED["directory (direct)"] = len(names)


async def run_corpus(serve: Serving, service: Any, names: List[bytes], root: Path) -> List[str]:
    port = int(service.ports[0].getHost().port)
    problems: List[str] = []
    for name in names:
        peer = serve.peer()
        started = time.monotonic()
        got = await download(peer, ("127.0.0.1", port), name, timeout=2.0)
        took = time.monotonic() - started
        served = got.data if got.complete else None
        problem = check(name, served, got.error, root)
        if problem:
            problems.append(problem)
        if took > 1.0:
            problems.append(f"{name!r}: answered after {took:.2f} s")
        await peer.transport.stopListening()
        serve.peers.remove(peer)
    # The reactor is still free: a plain file comes at once.
    peer = serve.peer()
    got = await download(peer, ("127.0.0.1", port), b"inside.txt", timeout=2.0)
    assert got.complete and got.data == INSIDE, got.error
    await serve.settled(service)
    await peer.transport.stopListening()
    serve.peers.remove(peer)
    await turn(0)
    return problems


@pytest.fixture
def stack(tree: Tuple[Path, Path], request: pytest.FixtureRequest) -> Iterator[Tuple[str, Any, List[Any]]]:
    """(kind, the server's backend, services to stop) for the kind named by the test's parameter."""
    root, _outside = tree
    kind = request.param
    sockets = short_dir("tfb-")
    stop: List[Any] = []
    if kind == "directory":
        backend: Any = DirectoryBackend(str(root))
    elif kind in ("amp-directory", "amp-reference"):
        eph = Path(sockets) / "eph"
        eph.mkdir()
        wrapped: Any = (DirectoryBackend(str(root)) if kind == "amp-directory"
                        else ReferenceBackend(str(root), str(eph), get_reactor()))
        responder = offload_service(wrapped, os.path.join(sockets, "b.sock"))
        responder.startService()
        backend = AMPBackend(os.path.join(sockets, "b.sock"), timeout=2.0, cache_ttl=0)
        backend.startService()
        stop += [backend, responder]
    else:
        _state, port = legacy_responder.listen(get_reactor(), os.path.join(sockets, "rackd.sock"), root,
                                              Path(sockets))
        backend = LegacyBackend(os.path.join(sockets, "rackd.sock"), timeout=2.0, late_grace=0)
        stop.append(port)
    yield kind, backend, stop
    for thing in stop:
        d = thing.stopService() if hasattr(thing, "stopService") else thing.stopListening()
        if d is not None:
            pytest_twisted.blockon(d)
    import shutil

    shutil.rmtree(sockets, ignore_errors=True)


@pytest.mark.parametrize("stack", ["directory", "amp-directory", "amp-reference", "legacy"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_corpus_through_the_wire(serve: Serving, stack: Tuple[str, Any, List[Any]],
                                       tree: Tuple[Path, Path]) -> None:
    kind, backend, _ = stack
    root, outside = tree
    names = corpus(outside)
    if kind == "amp-reference":
        names += [b"path/" + name for name in names]  # its path answers resolve through the directory too
    if kind == "legacy":
        names = [n for n in names if not n.lstrip(b"/").startswith(LEGACY_SKIPS)]
    # One client asks a thousand names in a row, each refused: no per-client or ERROR budget here
    # (test_abuse checks those); this test is about what each name gets.
    service = serve(backend, guard=GuardLimits(max_sessions_per_client=0, requests_per_second_per_client=0,
                                               error_replies_per_second=1_000_000))
    await turn(0.1)  # the AMP connection is made
    before = open_fds()
    problems = await run_corpus(serve, service, names, root)
    assert not problems, "\n".join(problems[:40]) + f"\n({len(problems)} problems)"
    await until(lambda: open_fds() <= before, 3.0, "descriptors to be closed")
    TRIED[kind] = len(names)


@pytest.mark.parametrize("seen", ["nothing", "a file inside"])
def test_a_directory_swapped_for_a_link_after_the_check_is_caught(tree: Tuple[Path, Path], seen: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The canonical path is checked, then opened: a directory on the way replaced by a symlink out in
    between (O_NOFOLLOW guards only the last component) is caught by where the descriptor really is,
    whether the walk saw no file (a symlink on the way) or a file inside the root that is not the one opened."""
    root, _outside = tree
    backend = DirectoryBackend(str(root))
    raced = str(root / "escape-dir" / "secret")  # what the walk checked was a directory, now a link out
    found = os.lstat(root / "inside.txt") if seen == "a file inside" else None
    # get_reader's step of resolving: the path, that nothing on the way was missing, and what the walk saw
    monkeypatch.setattr(backend, "_resolve", lambda name, directory=None: (raced, False, found))
    before = open_fds()
    with pytest.raises(AccessViolation, match="leaves the served directory"):
        backend.get_reader(b"swapped/secret")
    assert open_fds() == before


def test_the_file_the_walk_saw_is_served_without_asking_proc(tree: Tuple[Path, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """When the descriptor is the file the walk lstat'ed inside the root (same inode), where it really is
    needs no /proc lookup (two system calls a request fewer); a file replaced since would need one."""
    root, _outside = tree
    backend = DirectoryBackend(str(root))
    asked: List[str] = []
    real_readlink = os.readlink
    monkeypatch.setattr(os, "readlink", lambda path: asked.append(str(path)) or real_readlink(path))
    reader = backend.get_reader(b"inside.txt")
    try:
        assert reader.read(4096) == (root / "inside.txt").read_bytes()
    finally:
        reader.finish()
    assert asked == []
    (root / "inside.txt.new").write_bytes(b"replaced")
    walked = backend._resolve

    def replaced_after_the_walk(name: bytes, directory: Optional[str] = None) -> Any:
        found = walked(name, directory)
        os.replace(root / "inside.txt.new", root / "inside.txt")  # an operator's atomic update, just then
        return found

    monkeypatch.setattr(backend, "_resolve", replaced_after_the_walk)
    reader = backend.get_reader(b"inside.txt")
    try:
        assert reader.read(4096) == b"replaced"  # served: it is inside the root, as /proc says
    finally:
        reader.finish()
    assert len(asked) == 1 and asked[0].startswith("/proc/self/fd/")
