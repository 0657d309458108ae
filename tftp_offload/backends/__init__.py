"""Backends bundled with tftp-offload."""
