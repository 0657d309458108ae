"""A host program with tftp-offload inside it: its own backend, no twistd, no socket.

    python examples/embed.py [PORT [DIRECTORY]]

serves TFTP on 127.0.0.1:PORT (default 6969):

- `hello.cfg`: generated for each request from the addresses it came from
  and was sent to, the way a rack controller renders a pxelinux config;
- any other name: the file of that name under DIRECTORY (default: the
  current directory), or TFTP error 1.

Try `curl -s tftp://127.0.0.1:6969/hello.cfg`. Ctrl-C or SIGTERM stops it;
transfers still running get a few seconds to finish first.

The backend follows python-tx-tftp's contract, as MAAS's rack controller's
does: `get_reader(file_name)` returns a reader or a Deferred of one, and the
request's addresses are read from `twisted.python.context`.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater, react
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.python import context

from tftp_offload.backends.directory import DirectoryBackend
from tftp_offload.errors import Unsupported
from tftp_offload.readers import BytesReader
from tftp_offload.service import TFTPOffloadService

CONFIG = """\
DEFAULT install
LABEL install
  KERNEL http://{server}:5248/images/linux
  APPEND initrd=http://{server}:5248/images/initrd console=ttyS0 client={client}
"""


class GreetingBackend:
    """Generates `hello.cfg`; serves everything else from a directory."""

    def __init__(self, reactor: Any, root: str) -> None:
        self.reactor = reactor
        self.files = DirectoryBackend(root)

    def get_reader(self, file_name: bytes) -> Any:
        # The request's details are in the context only while get_reader runs: read them now.
        server, _server_port = context.get("local")  # the address the request was sent to
        client, _client_port = context.get("remote")
        if file_name.lstrip(b"/") == b"hello.cfg":
            # Stands in for real work (a database query, an RPC): the answer comes later, as a Deferred.
            return deferLater(self.reactor, 0.01, self._render, server, client)
        # Raises FileNotFound or AccessViolation, which become TFTP errors 1 and 2.
        return self.files.get_reader(file_name)

    @staticmethod
    def _render(server: str, client: str) -> BytesReader:
        return BytesReader(CONFIG.format(server=server, client=client).encode())

    def get_writer(self, file_name: bytes) -> None:
        raise Unsupported("read-only")  # never called: the server refuses write requests itself


def main(reactor: Any, port: str = "6969", root: str = ".") -> Deferred:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])

    services = MultiService()  # the host program's own service tree
    tftp = TFTPOffloadService(GreetingBackend(reactor, root), listen=[("127.0.0.1", int(port))])
    tftp.setServiceParent(services)
    services.startService()

    # On Ctrl-C or SIGTERM the reactor shuts down; stopping the services first (a Deferred the
    # shutdown waits for) closes the port and lets running transfers finish.
    reactor.addSystemEventTrigger("before", "shutdown", services.stopService)
    return Deferred()  # never fires: run until stopped


if __name__ == "__main__":
    react(main, sys.argv[1:])
