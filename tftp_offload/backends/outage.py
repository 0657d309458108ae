"""A backend that is down, as an operator wants to hear about it: once, then rarely, then once more.

Both socket backends (AMP, legacy) retry a backend that is down for as long
as it stays down; logging every failed attempt (or every refused request)
would bury the log. `Outage` logs one warning when the backend goes, a
reminder at most every `REMINDER_INTERVAL` seconds while it stays away, and
one info line when it is back. `explain` turns a failed connect into what
is wrong with the socket path (missing, a regular file, a stale socket...).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Any, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure

REMINDER_INTERVAL = 60.0
"""Seconds between two reminders that a backend is still down."""


def explain(path: str, failure: Optional[Failure] = None) -> str:
    """Why nothing answers on the UNIX socket `path`, in words an operator can act on."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"{path} does not exist: is the backend running (and is --socket right)?"
    except OSError as e:
        return f"cannot look at {path}: {e.strerror}"
    if stat.S_ISREG(mode):
        return f"{path} is a regular file, not a UNIX socket: is the backend running (and is --socket right)?"
    if stat.S_ISDIR(mode):
        return f"{path} is a directory, not a UNIX socket: --socket must name the backend's socket file"
    if not stat.S_ISSOCK(mode):
        return f"{path} is not a UNIX socket: is --socket right?"
    message = failure.getErrorMessage() if failure is not None else "cannot connect"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a UNIX connect is decided at once; never wait here
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            return f"permission denied on {path}: run as a user the socket's mode lets in (its group)"
        if e.errno == errno.ECONNREFUSED:
            return f"nothing listens on {path}: the backend is not running (a socket left by one that stopped)"
        return f"{path}: {e.strerror or message}"
    finally:
        probe.close()
    return f"{path} accepts connections, but: {message}"


class Outage:
    """Tracks one backend's availability and writes the few lines its comings and goings deserve."""

    def __init__(self, log: Logger, what: str, path: str, clock: Any,
                 interval: float = REMINDER_INTERVAL) -> None:
        self.log = log
        self.what = what
        self.path = path
        self.clock = clock
        self.interval = interval
        self.since: Optional[float] = None
        """When it went (reactor seconds), while it is down."""
        self.refused = 0
        """Requests answered "Backend unavailable" during this outage."""
        self.reason = ""
        self._reminded = 0.0

    @property
    def down(self) -> bool:
        return self.since is not None

    def went(self, reason: str, line: str = "Cannot reach {what} at {path}: {reason}; retrying quietly") -> None:
        """It is unreachable (a connect failed, the connection was lost): a warning the first time only,
        then a reminder now and then."""
        self.reason = reason
        now = self.clock.seconds()
        if self.since is None:
            self.since = self._reminded = now
            self.refused = 0
            self.log.warn(line, what=self.what, path=self.path, reason=reason, outcome="backend-down")
        elif now - self._reminded >= self.interval:
            self._reminded = now
            self.log.warn("Still cannot reach {what} at {path} after {seconds:.0f} s ({refused} requests "
                          "refused): {reason}", what=self.what, path=self.path, seconds=now - self.since,
                          refused=self.refused, reason=reason, outcome="backend-down")

    def back(self, quiet: bool = False) -> Optional[float]:
        """It answers again: seconds it was away, or None if it was not down. Says so in an info line
        unless `quiet` (the caller writes its own line)."""
        if self.since is None:
            return None
        away = self.clock.seconds() - self.since
        self.since = None
        if not quiet:
            self.log.info("Reached {what} at {path} again after {seconds:.1f} s ({refused} requests refused "
                          "meanwhile)", what=self.what, path=self.path, seconds=away, refused=self.refused,
                          outcome="backend-back")
        return away
