"""Tests of tftp_offload.offload: one test module per module of the package."""
