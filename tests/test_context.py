"""RequestContext: the one writer and reader of the `twisted.python.context` keys backends use."""

from __future__ import annotations

from twisted.python import context

from tftp_offload.context import RequestContext


def test_as_context_writes_the_tx_tftp_keys() -> None:
    ctx = RequestContext(("192.0.2.1", 69), ("192.0.2.7", 40000), "netascii", {"blksize": "1468"})
    assert ctx.as_context() == {
        "local": ("192.0.2.1", 69),
        "remote": ("192.0.2.7", 40000),
        "mode": "netascii",
        "options": {"blksize": "1468"},
        "protocol": "tftp",
    }


def test_call_sets_the_keys_a_backend_reads_and_current_reads_them_back() -> None:
    ctx = RequestContext(("2001:db8::1", 69), ("2001:db8::7", 1234), "octet", {"tsize": "0"})
    seen = ctx.call(lambda: (context.get("local"), context.get("remote"), context.get("mode"),
                             context.get("options"), RequestContext.current()))
    assert seen[:4] == (("2001:db8::1", 69), ("2001:db8::7", 1234), "octet", {"tsize": "0"})
    assert seen[4] == ctx


def test_current_outside_a_request_is_none() -> None:
    assert RequestContext.current() is None


def test_current_fills_in_what_a_wrapping_backend_left_out() -> None:
    got = context.call({"local": ["192.0.2.1", "69"], "remote": ("192.0.2.7", 5)}, RequestContext.current)
    assert got == RequestContext(("192.0.2.1", 69), ("192.0.2.7", 5), "octet", {}, "tftp")


def test_the_options_are_copied_not_shared() -> None:
    options = {"blksize": "512"}
    ctx = RequestContext(("192.0.2.1", 69), ("192.0.2.7", 5), options=options)
    ctx.as_context()["options"]["blksize"] = "9000"
    assert ctx.options == {"blksize": "512"}
