"""Backends bundled with tftp-offload (the offload protocol's, AMP and legacy, are in `tftp_offload.offload`)."""
