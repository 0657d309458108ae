"""Exceptions a backend raises to choose the TFTP error its client gets.

The names follow python-tx-tftp's `tftp.errors`, so MAAS-style backends read
the same; `error_for` also maps tx-tftp's own classes by name, so a backend
that raises those (without tx-tftp installed here) gets the same answer.
"""

from __future__ import annotations

from typing import Tuple

from .packets import ErrorCode


class TFTPError(Exception):
    """Base: `code` is the TFTP error code the client is sent, the message its text."""

    code: int = ErrorCode.NOT_DEFINED


class FileNotFound(TFTPError):
    code = ErrorCode.FILE_NOT_FOUND


class AccessViolation(TFTPError):
    code = ErrorCode.ACCESS_VIOLATION


class Unsupported(TFTPError):
    code = ErrorCode.ILLEGAL_OPERATION


class BackendError(TFTPError):
    code = ErrorCode.NOT_DEFINED


_BY_NAME = {
    "FileNotFound": (ErrorCode.FILE_NOT_FOUND, "File not found"),
    "AccessViolation": (ErrorCode.ACCESS_VIOLATION, "Access violation"),
    "Unsupported": (ErrorCode.ILLEGAL_OPERATION, "Unsupported operation"),
    "BackendError": (ErrorCode.NOT_DEFINED, "Backend error"),
    "FileNotFoundError": (ErrorCode.FILE_NOT_FOUND, "File not found"),
    "PermissionError": (ErrorCode.ACCESS_VIOLATION, "Access violation"),
}


_OWN_TEXT = frozenset({"Unsupported", "BackendError"})
"""Foreign classes (tx-tftp's) whose own text goes to the client, as tx-tftp sends it; for the
others tx-tftp sends the standard text, and so do we: its FileNotFound's str() is the server's
path, which is no business of the client's."""


def error_for(exc: BaseException) -> Tuple[int, str, bool]:
    """(TFTP code, message for the client, whether it is expected) for a backend's exception.

    Unexpected exceptions give error 0 with a generic message: the client is
    told something went wrong, the operator gets the traceback in the log, and
    no internal detail leaks onto the network.
    """
    name = next((cls.__name__ for cls in type(exc).__mro__ if cls.__name__ in _BY_NAME), None)
    if isinstance(exc, TFTPError):
        default = _BY_NAME[name][1] if name else "Backend error"
        return int(exc.code), str(exc) or default, True
    if name is None:
        return ErrorCode.NOT_DEFINED, "Internal server error", False
    code, default = _BY_NAME[name]
    if name in _OWN_TEXT and not isinstance(exc, OSError):
        return code, str(exc) or default, True
    return code, default, True
