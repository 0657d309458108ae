"""The offload protocol's commands: what the TFTP server and a backend say to each other over a UNIX socket.

Both sides import this module: the server's client (`offload.client.AMPBackend`)
and the backend-side responder (`offload.responder`). docs/offload-protocol.md
describes every argument and the versioning rules; the doc and this module
must change together (tests/offload/test_commands.py checks that every argument
named here is documented there).

The shape, in one breath: the server says `Hello`, then sends one
`ReadRequest` per RRQ it cannot answer from its short-lived cache, and gets
back one answer kind:

    inline     the bytes themselves (small, generated content)
    fd         an open descriptor passed with SCM_RIGHTS (a real file; no
               shared permissions or paths needed)
    path       a file the server opens itself (static content)
    ephemeral  a file the server opens and unlinks at once (so nothing is
               left behind, whatever happens next)
    stream     a stream id the server pulls with `ReadChunk` and releases
               with `CloseStream` (large or unknown-size generated content)

or a typed error carrying the TFTP error code and the message for the
client. After each transfer the server may send `TransferFinished`.
"""

from __future__ import annotations

from twisted.protocols import amp

from ..errors import AMP_ERRORS, BackendError

PROTOCOL_VERSION = 1
"""The highest version this code speaks; `Hello` settles on min(ours, theirs)."""

MIN_PROTOCOL_VERSION = 1
"""The lowest version this code still speaks."""

# Answer kinds (the `kind` of a ReadRequest answer).
INLINE = "inline"
FD = "fd"
PATH = "path"
EPHEMERAL = "ephemeral"
STREAM = "stream"
KINDS = (INLINE, FD, PATH, EPHEMERAL, STREAM)

BASELINE_KINDS = (INLINE, STREAM)
"""Kinds every version-1 server accepts; the others are offered as capabilities in `Hello`."""

TRANSFER_FINISHED = "transfer-finished"
"""Capability: the responder wants `TransferFinished` reports."""

CAPABILITIES = (INLINE, FD, PATH, EPHEMERAL, STREAM, TRANSFER_FINISHED)
"""Every capability this code knows; a peer ignores names it does not know."""

AMP_VALUE_MAX = 0xFFFF
"""AMP refuses a value longer than 65,535 bytes (amp.TooLong) before sending it."""

INLINE_MAX = 60 * 1024
"""Largest inline answer, and the largest `ReadChunk`: under the AMP value cap with room to spare."""

CHUNK_MAX = INLINE_MAX


class IncompatibleVersion(Exception):
    """`Hello` found no protocol version both sides speak."""


class StreamGone(Exception):
    """`ReadChunk` named a stream the responder does not hold (closed, idle too long, never opened)."""


class BadRequest(Exception):
    """A request the responder cannot make sense of (a chunk too large, an offset out of order)."""


class Hello(amp.Command):
    """Server -> backend, first thing on every connection: agree on a version and capabilities."""

    arguments = [
        (b"version", amp.Integer()),
        (b"min_version", amp.Integer(optional=True)),
        (b"capabilities", amp.ListOf(amp.Unicode())),
        (b"software", amp.Unicode(optional=True)),
    ]
    response = [
        (b"version", amp.Integer()),
        (b"capabilities", amp.ListOf(amp.Unicode())),
        (b"software", amp.Unicode(optional=True)),
    ]
    errors = {IncompatibleVersion: b"INCOMPATIBLE_VERSION"}


class ReadRequest(amp.Command):
    """Server -> backend: what does this RRQ get?"""

    arguments = [
        (b"request_id", amp.Integer()),
        (b"local_ip", amp.Unicode()),
        (b"local_port", amp.Integer()),
        (b"remote_ip", amp.Unicode()),
        (b"remote_port", amp.Integer()),
        (b"filename", amp.String()),
        (b"mode", amp.Unicode()),
        (b"options", amp.AmpList([(b"name", amp.Unicode()), (b"value", amp.Unicode())])),
    ]
    response = [
        (b"kind", amp.Unicode()),
        (b"size", amp.Integer(optional=True)),
        (b"data", amp.String(optional=True)),
        (b"path", amp.String(optional=True)),
        (b"fd", amp.Descriptor(optional=True)),
        (b"stream_id", amp.Integer(optional=True)),
        (b"max_age", amp.Float(optional=True)),
    ]
    errors = dict(AMP_ERRORS)  # the typed errors of a lookup: errors.ERRORS, declared once


class ReadChunk(amp.Command):
    """Server -> backend: the next `length` bytes of a stream, from `offset` (always where the last ended)."""

    arguments = [
        (b"stream_id", amp.Integer()),
        (b"offset", amp.Integer()),
        (b"length", amp.Integer()),
    ]
    response = [
        (b"data", amp.String()),
        (b"eof", amp.Boolean()),
    ]
    errors = {StreamGone: b"STREAM_GONE", BadRequest: b"BAD_REQUEST", BackendError: AMP_ERRORS[BackendError]}


class CloseStream(amp.Command):
    """Server -> backend: done with a stream (whether or not it was read to the end). No answer."""

    arguments = [(b"stream_id", amp.Integer())]
    requiresAnswer = False


class TransferFinished(amp.Command):
    """Server -> backend, if the backend asked for it: how one transfer of an answer went. No answer."""

    arguments = [
        (b"request_id", amp.Integer()),
        (b"outcome", amp.Unicode()),
        (b"filename", amp.String()),
        (b"local_ip", amp.Unicode()),
        (b"local_port", amp.Integer()),
        (b"remote_ip", amp.Unicode()),
        (b"remote_port", amp.Integer()),
        (b"bytes", amp.Integer()),
        (b"duration", amp.Float()),
        (b"blksize", amp.Integer()),
        (b"windowsize", amp.Integer()),
        (b"retransmits", amp.Integer()),
        (b"client_error", amp.Unicode(optional=True)),
    ]
    requiresAnswer = False


COMMANDS = (Hello, ReadRequest, ReadChunk, CloseStream, TransferFinished)


def settle_version(theirs: int, their_min: int) -> int:
    """The version to speak with a peer speaking `their_min`..`theirs`, or raise `IncompatibleVersion`."""
    version = min(theirs, PROTOCOL_VERSION)
    if version < max(their_min, MIN_PROTOCOL_VERSION):
        raise IncompatibleVersion(
            f"peer speaks versions {their_min}..{theirs}, we speak {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}"
        )
    return version

