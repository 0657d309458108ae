"""A child process handed sockets as systemd hands them: descriptors 3, 4, 5 and LISTEN_* set.

`inherited_datagram_sockets` probes descriptors from 3 upward. In the pytest process those belong
to pytest and the reactor, so the exact numbering (3, 4, 5...) is checked in a child process that
owns its descriptors (tests/test_activation.py, and tests/test_tap.py for what Options does with them).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from tests.support.harness import REPO

CHILD = r"""
import fcntl, json, os, sys
from tftp_offload.activation import inherited_datagram_sockets
from tftp_offload.tap import Options

# What systemd does: the passed sockets become descriptors 3, 4, 5 (blocking, as they come).
sources = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 100) for fd in sys.argv[2:]]
for number, source in enumerate(sources, 3):
    os.dup2(source, number, inheritable=False)
    os.close(source)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(sources)), LISTEN_FDNAMES="a:b:c")
if sys.argv[1] == "function":
    print(json.dumps(inherited_datagram_sockets()))
elif sys.argv[1] == "workers":
    try:
        Options().parseOptions(["--root", "/", "--workers", "2"])
        print(json.dumps("accepted"))
    except Exception as e:
        print(json.dumps(str(e)))
else:
    options = Options()
    options.parseOptions(["--root", "/"])
    print(json.dumps({"inherited": options.inherited, "listen": options.listen}))
print(json.dumps(sorted(k for k in os.environ if k.startswith("LISTEN_"))))
"""


def run_child(mode: str) -> list:
    """Run CHILD with a UDP v4, a TCP and a UDP v6 socket as descriptors 3, 4 and 5."""
    v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with v4, tcp, v6:
        v4.bind(("127.0.0.1", 0))
        v6.bind(("::1", 0))
        fds = [v4.fileno(), tcp.fileno(), v6.fileno()]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        done = subprocess.run([sys.executable, "-c", CHILD, mode, *map(str, fds)], pass_fds=fds, env=env,
                              capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]
