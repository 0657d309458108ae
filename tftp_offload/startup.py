"""Start-up checks for twistd: an operator's mistake becomes one line naming option, value and remedy.

twistd prints a usage error after its whole option list, reports an error
raised while the service starts as a long traceback, and in daemon mode cuts
that message at 100 bytes. So what can be checked before twistd forks is
checked here, while the options are parsed: each `--listen` address is
resolved and test-bound the way the service will bind it, which turns EACCES,
EADDRINUSE, EADDRNOTAVAIL and unknown host names into one `UsageError` line.
The `--root` readability check runs once the service starts, as the user the
process then runs as (twistd may shed privileges after parsing).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from contextlib import ExitStack
from typing import List, NoReturn, Sequence, Tuple

from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from .logs import address as show
from .udp import bind_address

log = Logger(namespace="tftp_offload")

Listen = Tuple[str, int]


class StartupError(usage.UsageError):
    """The options are well-formed but this host cannot do what they say (no --help hint needed)."""


def fail(message: str) -> NoReturn:
    """Under twistd: the message alone on stderr, exit status 1 (not after the 40-line option list).

    The terminal's stderr (`sys.__stderr__`): once twistd logs, `sys.stderr` goes to the log.
    """
    stderr = sys.__stderr__ or sys.stderr
    stderr.write(f"tftp-offload: {message}\n")
    stderr.flush()
    raise SystemExit(1)


def failed_to_listen(error: CannotListenError, nodaemon: bool) -> NoReturn:
    """A port lost between the check at option time and the bind: the same one line, then exit 1.

    In the foreground it goes to stderr. A daemon's stderr is gone by then, and twistd
    passes its parent only the first 100 bytes of an exception: the line goes to the log
    and a short exception to twistd.
    """
    host = str(error.interface or "::")
    reason = error.socketError if isinstance(error.socketError, OSError) else OSError(str(error.socketError))
    line = listen_failure(show(host, error.port), host, error.port, reason)
    log.error("{line}", line=line, event="start-failed")
    if nodaemon:
        fail(line)
    raise StartupError(f"{show(host, error.port)}: {reason.strerror or reason}; see the log")


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def resolve(text: str, host: str, port: int) -> List[Listen]:
    """`host` as the addresses to bind: itself if an IP address, else every address the name has."""
    if _is_literal(host):
        return [(host, port)]
    try:
        found = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_DGRAM, 0, socket.AI_NUMERICSERV)
    except (OSError, UnicodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise StartupError(f"--listen {text}: cannot resolve the host name {host!r} ({reason}): give an IP "
                               f"address, e.g. --listen 127.0.0.1:{port} or --listen [::]:{port} for all") from None
    addresses: List[Listen] = []
    for family, _, _, _, sockaddr in found:
        if family in (socket.AF_INET, socket.AF_INET6) and (str(sockaddr[0]), port) not in addresses:
            addresses.append((str(sockaddr[0]), port))
    if not addresses:
        raise StartupError(f"--listen {text}: {host!r} has no IPv4 or IPv6 address: give an IP address")
    return addresses


def listen_failure(text: str, host: str, port: int, error: OSError) -> str:
    """The one line that says why `--listen text` cannot be bound, and what to do."""
    code = error.errno
    if code == errno.EACCES and 0 < port < 1024:
        return (f"--listen {text}: port {port} needs privilege: run as root, or give the process "
                f"CAP_NET_BIND_SERVICE (setpriv --inh-caps=+net_bind_service --ambient-caps=+net_bind_service "
                f"twistd ..., or AmbientCapabilities=CAP_NET_BIND_SERVICE in its systemd unit), or use socket "
                f"activation (systemd-socket-activate --datagram --fdname=tftp -l {port} twistd -n tftp-offload "
                f"... without --listen), or a port above 1023")
    if code == errno.EADDRINUSE:
        return (f"--listen {text}: UDP port {port} on {host} is already in use (another TFTP server? see "
                f"ss -ulpn 'sport = :{port}'): stop it, or choose another --listen")
    if code == errno.EADDRNOTAVAIL:
        return (f"--listen {text}: {host} is not an address of this host (see ip -brief address): give one of "
                f"its addresses, or [::]:{port} for all of them")
    if code == errno.EAFNOSUPPORT:
        return f"--listen {text}: IPv6 is disabled on this host: use --listen 0.0.0.0:{port}"
    return f"--listen {text}: cannot listen on {show(host, port)}: {error.strerror or error}"


def check_listen(wanted: Sequence[Tuple[str, Listen]], reuse_port: bool = False) -> None:
    """Bind each (text, (host, port)) as the service will, all at once, then let go: one line if one fails.

    The same IPv6-only rule as `TFTPOffloadService` (a wildcard IPv6 socket
    is dual-stack unless an IPv4 address is asked for on its port), so that
    what passes here also binds there.
    """
    v4_ports = {port for _, (host, port) in wanted if ":" not in host}
    seen = set()
    with ExitStack() as stack:
        for text, (host, port) in wanted:
            if port and (host, port) in seen:
                raise usage.UsageError(f"--listen {text}: given twice")
            seen.add((host, port))
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                sock = stack.enter_context(socket.socket(family, socket.SOCK_DGRAM))
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(port in v4_ports))
                if reuse_port:  # --workers: the processes share each address, as the service binds it
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(bind_address(host, port))  # a link-local scope too
            except OSError as e:
                raise StartupError(listen_failure(text, host, port, e)) from None


def check_root(root: str) -> None:
    """Warn when the user this process runs as cannot list `root`, or read files at its top.

    Tried for real (listing, opening), not with access(2): capabilities and
    ACLs decide, as they will for each request.
    """
    user = _user()
    try:
        names = sorted(os.listdir(root))
    except OSError as e:
        log.warn("--root {root}: {user} cannot list it ({error}): every request will be refused; give {user} "
                 "read and search permission (e.g. chmod o+rx {root}) or run as a user that has it",
                 root=root, user=user, error=e.strerror or str(e))
        return
    unreadable = []
    for name in names[:200]:
        path = os.path.join(root, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            continue  # a dangling symlink: the request for it gets "file not found", as it should
        except OSError:
            unreadable.append(name)
            continue
        os.close(fd)
    if unreadable:
        log.warn("--root {root}: {user} cannot read {count} of its first {checked} entries (e.g. {example}): "
                 "requests for them will be refused; check their permissions", root=root, user=user,
                 count=len(unreadable), checked=min(len(names), 200), example=unreadable[0])


def _user() -> str:
    uid = os.geteuid()
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def version() -> str:
    import platform

    import twisted

    from . import __version__

    return f"tftp-offload {__version__} (Twisted {twisted.__version__}, Python {platform.python_version()})"
