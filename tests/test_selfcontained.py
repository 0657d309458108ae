"""The test suite runs from a plain clone: nothing in it needs ../shared or what is built from it."""

from __future__ import annotations

from harness import REPO


def test_no_test_uses_the_benchmark_kit() -> None:
    offenders = []
    for path in sorted((REPO / "tests").glob("*.py")):
        text = path.read_text()
        for needle in ("build/bench", '"bench"', "../shared", "TFTP_SHARED", "TFTP_BENCH_HOME", "tftpload"):
            if needle in text and path.name != "test_selfcontained.py":
                offenders.append(f"{path.name}: {needle}")
    assert not offenders, offenders

