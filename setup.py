"""Kept for tools (and Debian's pybuild) that still call setup.py; metadata is in setup.cfg."""

from setuptools import setup

setup()
