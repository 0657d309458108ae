"""error_for: the TFTP error a backend's exception becomes, and what must not leak."""

from __future__ import annotations

import errno

import pytest

from tftp_offload import errors
from tftp_offload.errors import AccessViolation, BackendError, FileNotFound, TFTPError, Unsupported, error_for
from tftp_offload.packets import ErrorCode

# -- our own classes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc, expected",
    [
        (FileNotFound("File not found"), (1, "File not found")),
        (FileNotFound("No pxelinux.cfg for this MAC"), (1, "No pxelinux.cfg for this MAC")),
        (FileNotFound(), (1, "File not found")),
        (AccessViolation("Access violation: '..' in filename"), (2, "Access violation: '..' in filename")),
        (AccessViolation(), (2, "Access violation")),
        (Unsupported("Write requests are not supported"), (4, "Write requests are not supported")),
        (Unsupported(), (4, "Unsupported operation")),
        (BackendError("rack controller unavailable"), (0, "rack controller unavailable")),
        (BackendError(), (0, "Backend error")),
        (TFTPError(), (0, "Backend error")),
    ],
)
def test_our_classes(exc: BaseException, expected: tuple[int, str]) -> None:
    assert error_for(exc) == (*expected, True)


def test_codes_are_the_tftp_codes() -> None:
    assert (FileNotFound.code, AccessViolation.code, Unsupported.code, BackendError.code) == (1, 2, 4, 0)
    assert FileNotFound.code == ErrorCode.FILE_NOT_FOUND
    assert AccessViolation.code == ErrorCode.ACCESS_VIOLATION
    assert Unsupported.code == ErrorCode.ILLEGAL_OPERATION
    assert BackendError.code == ErrorCode.NOT_DEFINED


def test_subclass_without_a_message_gets_its_parents_default() -> None:
    class NoConfigForMachine(FileNotFound):
        pass

    class ReadOnly(Unsupported):
        pass

    assert error_for(NoConfigForMachine()) == (1, "File not found", True)
    assert error_for(NoConfigForMachine("nothing for 01-aa-bb")) == (1, "nothing for 01-aa-bb", True)
    assert error_for(ReadOnly()) == (4, "Unsupported operation", True)


def test_subclass_may_choose_its_own_code() -> None:
    class DiskFull(TFTPError):
        code = ErrorCode.DISK_FULL

    assert error_for(DiskFull("full")) == (3, "full", True)


# -- python-tx-tftp's classes, by module and name ----------------------------------------------


class _Tx:
    """Stand-ins for `tftp.errors` of python-tx-tftp (not installed here): same names, same tree."""

    class TFTPError(Exception):
        pass

    class BackendError(TFTPError):
        pass

    class Unsupported(BackendError):
        pass

    class AccessViolation(BackendError):
        pass

    class FileNotFound(BackendError):
        def __init__(self, file_path: object) -> None:
            self.file_path = file_path

        def __str__(self) -> str:
            return f"File not found: {self.file_path}"


for _cls in (_Tx.TFTPError, _Tx.BackendError, _Tx.Unsupported, _Tx.AccessViolation, _Tx.FileNotFound):
    _cls.__module__, _cls.__qualname__ = "tftp.errors", _cls.__name__  # where python-tx-tftp defines them


def test_tx_tftp_classes_are_foreign() -> None:
    assert not issubclass(_Tx.FileNotFound, errors.TFTPError)
    assert _Tx.FileNotFound.__name__ == "FileNotFound"


def test_tx_tftp_file_not_found_does_not_leak_the_path() -> None:
    """tx-tftp's own backend raises FileNotFound(FilePath('/var/lib/maas/...')); tx-tftp sends
    the standard text for it, and so must we: the server's paths are not the client's business."""
    exc = _Tx.FileNotFound("FilePath('/var/lib/maas/boot-resources/current/secret')")
    code, message, expected = error_for(exc)
    assert (code, expected) == (1, True)
    assert "/var/lib" not in message and "secret" not in message
    assert message == "File not found"


def test_tx_tftp_access_violation_gives_the_standard_text() -> None:
    exc = _Tx.AccessViolation("/srv/tftp/../etc/shadow is outside /srv/tftp")
    assert error_for(exc) == (2, "Access violation", True)


def test_tx_tftp_unsupported_and_backend_error_carry_their_text() -> None:
    """tx-tftp sends str(e) for these two: that text is written for the client."""
    assert error_for(_Tx.Unsupported("Writing is not supported")) == (4, "Writing is not supported", True)
    assert error_for(_Tx.BackendError("No boot images have been imported")) == (
        0,
        "No boot images have been imported",
        True,
    )
    assert error_for(_Tx.Unsupported()) == (4, "Unsupported operation", True)


def test_subclass_of_a_tx_tftp_class_maps_through_its_bases() -> None:
    class MaasFileNotFound(_Tx.FileNotFound):
        pass

    assert error_for(MaasFileNotFound("/secret")) == (1, "File not found", True)


# -- OSError and the rest ---------------------------------------------------------------------------


def test_os_errors_map_without_their_paths() -> None:
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "/srv/secret/grub.cfg")
    assert error_for(missing) == (1, "File not found", True)
    denied = PermissionError(errno.EACCES, "Permission denied", "/srv/secret/grub.cfg")
    assert error_for(denied) == (2, "Access violation", True)


def test_os_error_subclass_maps_through_its_bases() -> None:
    class BackendMissing(FileNotFoundError):
        pass

    assert error_for(BackendMissing(errno.ENOENT, "gone", "/srv/x")) == (1, "File not found", True)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("connection to /run/maas/secret.sock lost"),
        KeyError("secret-key"),
        ValueError("password=hunter2"),
        OSError(errno.EIO, "Input/output error", "/srv/secret"),
        ZeroDivisionError(),
        Exception(),
    ],
)
def test_unknown_exceptions_are_error_0_and_leak_nothing(exc: BaseException) -> None:
    code, message, expected = error_for(exc)
    assert code == ErrorCode.NOT_DEFINED
    assert expected is False
    assert message == "Internal server error"


# -- the one table ----------------------------------------------------------------------------------


def test_each_class_is_declared_once_and_the_amp_names_are_distinct() -> None:
    classes = [cls for cls, _ in errors.ERRORS]
    assert len(classes) == len(set(classes))
    names = list(errors.AMP_ERRORS.values())
    assert len(names) == len(set(names))
    assert set(errors.AMP_ERRORS) == {FileNotFound, AccessViolation, Unsupported, BackendError}


def test_a_class_of_a_tx_tftp_name_from_elsewhere_is_not_theirs() -> None:
    """Matched by module and name: a FileNotFound of some other library is an unexpected exception."""

    class FileNotFound(Exception):
        pass

    assert error_for(FileNotFound("/srv/x")) == (ErrorCode.NOT_DEFINED, "Internal server error", False)
