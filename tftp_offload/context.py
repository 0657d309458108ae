"""`RequestContext`: who asked for a file, where, and how, as backends see it.

python-tx-tftp passes a request's details to `IBackend.get_reader` not as arguments but in
`twisted.python.context` ("local", "remote", "mode", "options"), and MAAS's backend reads
them there. This value is the one place those keys are written (`as_context`) and read back
(`current`): the driver, the offload responder and the backends all go through it.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple, TypeVar

from twisted.python import context

T = TypeVar("T")

Endpoint = Tuple[str, int]

KEYS = ("local", "remote", "mode", "options", "protocol")
"""The `twisted.python.context` keys a request sets."""

_NO_OPTIONS: Mapping[str, str] = MappingProxyType({})


class RequestContext(NamedTuple):
    """One read request's context (immutable).

    A NamedTuple rather than a frozen dataclass: the driver builds one per request, and a
    frozen dataclass's `__init__` (an `object.__setattr__` per field) cost five times as much.

    - `local`: (address, port) the RRQ arrived at (the address replies come from);
    - `remote`: (address, port) of the client;
    - `mode`: "octet" or "netascii";
    - `options`: the RFC 2347 options as the client sent them (lower-cased names);
    - `protocol`: how the request arrived, as MAAS's backend names it ("tftp"; its HTTP
      boot handler says "http").
    """

    local: Endpoint
    remote: Endpoint
    mode: str = "octet"
    options: Mapping[str, str] = _NO_OPTIONS
    protocol: str = "tftp"

    def as_context(self) -> Dict[str, Any]:
        """The `twisted.python.context` dict python-tx-tftp backends read."""
        return {
            "local": self.local,
            "remote": self.remote,
            "mode": self.mode,
            "options": dict(self.options),
            "protocol": self.protocol,
        }

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` with this request's context set, as a backend expects to be called."""
        return context.call(self.as_context(), function, *args)

    @classmethod
    def current(cls) -> Optional["RequestContext"]:
        """The context of the request being looked up, or None outside one (a backend called directly).

        Missing or malformed keys are given their defaults: a backend wrapping another may set
        only some of them.
        """
        local = context.get("local")
        remote = context.get("remote")
        if local is None or remote is None:
            return None
        return cls(
            local=(str(local[0]), int(local[1])),
            remote=(str(remote[0]), int(remote[1])),
            mode=context.get("mode") or "octet",
            options=dict(context.get("options") or {}),
            protocol=context.get("protocol") or "tftp",
        )
