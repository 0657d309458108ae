"""tftp-offload: a TFTP read server for network boot whose files come from a pluggable backend."""

__version__ = "0.1.0"
