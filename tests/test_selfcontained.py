"""The test suite runs from a plain clone: nothing in it needs the benchmark kit beside the repository."""

from __future__ import annotations

from tests.support.harness import REPO


def test_no_test_uses_the_benchmark_kit() -> None:
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        text = path.read_text()
        # Spelt in pieces, so that this file does not name what it looks for.
        for needle in ("build/bench", '"bench"', ".." + "/shared", "TFTP_" + "SHARED", "TFTP_BENCH_HOME", "tftpload"):
            if needle in text and path.name != "test_selfcontained.py":
                offenders.append(f"{path.name}: {needle}")
    assert not offenders, offenders

