"""The backend contract: python-tx-tftp's `IBackend` and `IReader`, kept as they are.

MAAS's rack controller already implements this contract for its own TFTP
server, so any backend written for python-tx-tftp plugs in here unchanged.
The request's details are not arguments but live in `twisted.python.context`
while `get_reader` runs (see `context.RequestContext`), which is how tx-tftp passes
them and why backends that ignore them keep working.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IReader(Interface):
    """What to send: one file's bytes, read front to back once."""

    size = Attribute("The length in bytes, or None when unknown (then tsize is not answered).")

    def read(size):  # type: ignore[no-untyped-def]
        """Return up to `size` bytes (or a Deferred of them); fewer than `size` means end of file."""

    def finish():  # type: ignore[no-untyped-def]
        """Called once when the transfer ends, however it ends: release what the reader holds."""


class IBackend(Interface):
    """Decides what a read request gets.

    Optionally, a `reads_context` attribute: False when `get_reader` never looks at the
    request's `twisted.python.context`, which is then not set for it (a context push per
    request saved: a boot storm's small files are microseconds each). Without the attribute,
    as for every tx-tftp backend, the context is set.
    """

    def get_reader(file_name):  # type: ignore[no-untyped-def]
        """Return an `IReader` (or a Deferred of one) for `file_name` (bytes, as sent).

        Raise (or fail the Deferred with) `FileNotFound`, `AccessViolation`,
        `BackendError` from `tftp_offload.errors`; any other exception is a
        TFTP error 0 for the client and a logged traceback for the operator.
        """

    def get_writer(file_name):  # type: ignore[no-untyped-def]
        """Part of tx-tftp's contract; never called: this server refuses writes."""
