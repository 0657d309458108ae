"""Exceptions a backend raises to choose the TFTP error its client gets, and the one table that maps them.

The names follow python-tx-tftp's `tftp.errors`, so MAAS-style backends read the same.
`ERRORS` says, once, for every exception class a backend may raise: the TFTP code, the
standard text, whether the exception's own text goes to the client, and the name it travels
under in the offload protocol. `error_for` (the driver, the responder) and the offload commands'
`errors` (`AMP_ERRORS`, `carrier`) are views of it.

python-tx-tftp is not a dependency: its classes are rows named by module and class
(`tftp.errors.FileNotFound`), matched exactly (never a class of that name from elsewhere), so a
backend raising them gets what python-tx-tftp itself would send.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Type, Union

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


@dataclass(frozen=True)
class Mapping:
    """What one exception class means for the client."""

    code: int
    text: str
    """The standard text: sent when the exception's own text is empty or not for the client."""
    own_text: bool
    """The exception's str() goes to the client (it was written for the client)."""
    amp_name: Optional[bytes] = None
    """The name the class travels under in the offload protocol (None: it does not travel)."""


TX_TFTP = "tftp.errors"
"""python-tx-tftp's module of exceptions."""

ERRORS: Tuple[Tuple[Union[type, str], Mapping], ...] = (
    (FileNotFound, Mapping(ErrorCode.FILE_NOT_FOUND, "File not found", True, b"FILE_NOT_FOUND")),
    (AccessViolation, Mapping(ErrorCode.ACCESS_VIOLATION, "Access violation", True, b"ACCESS_VIOLATION")),
    (Unsupported, Mapping(ErrorCode.ILLEGAL_OPERATION, "Unsupported operation", True, b"ILLEGAL_OPERATION")),
    (BackendError, Mapping(ErrorCode.NOT_DEFINED, "Backend error", True, b"BACKEND_ERROR")),
    (TFTPError, Mapping(ErrorCode.NOT_DEFINED, "Backend error", True)),
    # The text of these names a server path, which is no business of the client's.
    (FileNotFoundError, Mapping(ErrorCode.FILE_NOT_FOUND, "File not found", False)),
    (PermissionError, Mapping(ErrorCode.ACCESS_VIOLATION, "Access violation", False)),
    # python-tx-tftp sends the standard text for these two (its FileNotFound's str() is a path)...
    (f"{TX_TFTP}.FileNotFound", Mapping(ErrorCode.FILE_NOT_FOUND, "File not found", False)),
    (f"{TX_TFTP}.AccessViolation", Mapping(ErrorCode.ACCESS_VIOLATION, "Access violation", False)),
    # ...and the exception's own text for these.
    (f"{TX_TFTP}.Unsupported", Mapping(ErrorCode.ILLEGAL_OPERATION, "Unsupported operation", True)),
    (f"{TX_TFTP}.BackendError", Mapping(ErrorCode.NOT_DEFINED, "Backend error", True)),
)
"""Exception class (or, for python-tx-tftp's, "module.Class") -> what it means. Declared once."""

_BY_KEY: Dict[Union[type, str], Mapping] = dict(ERRORS)

AMP_ERRORS: Dict[Type[Exception], bytes] = {
    cls: m.amp_name for cls, m in ERRORS if isinstance(cls, type) and m.amp_name is not None
}
"""The typed errors of an offload lookup (`ReadRequest.errors`): AMP sends the class's name and the text."""

_CARRIER: Dict[int, Type[TFTPError]] = {
    m.code: cls for cls, m in reversed(ERRORS) if cls in AMP_ERRORS and issubclass(cls, TFTPError)  # type: ignore[arg-type]
}
"""TFTP code -> the class that carries it over AMP (BackendError for 0)."""


def carrier(code: int, message: str) -> TFTPError:
    """The exception that carries TFTP error `code` and `message` over AMP; a code without a class of
    its own travels as `BackendError` (error 0, which every client understands)."""
    return _CARRIER.get(code, BackendError)(message)


def mapping_of(exc: BaseException) -> Optional[Mapping]:
    """The row of the nearest class of `exc` (along its MRO) that `ERRORS` names, or None."""
    for cls in type(exc).__mro__:
        found = _BY_KEY.get(cls)
        if found is None and cls.__module__ == TX_TFTP:
            found = _BY_KEY.get(f"{TX_TFTP}.{cls.__qualname__}")
        if found is not None:
            return found
    return None


def error_for(exc: BaseException) -> Tuple[int, str, bool]:
    """(TFTP code, message for the client, whether it is expected) for a backend's exception.

    Unexpected exceptions give error 0 with a generic message: the client is
    told something went wrong, the operator gets the traceback in the log, and
    no internal detail leaks onto the network.
    """
    found = mapping_of(exc)
    if found is None:
        return ErrorCode.NOT_DEFINED, "Internal server error", False
    code = int(exc.code) if isinstance(exc, TFTPError) else found.code  # a subclass may choose its code
    return code, (str(exc) or found.text) if found.own_text else found.text, True
