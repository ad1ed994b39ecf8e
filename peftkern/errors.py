"""Errors that mean "the user asked for something that cannot work", not "peftkern broke"."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input (a missing path, a malformed file, an unknown name). The `peftkern` command
    prints it as one line on stderr and exits with status 2, without a traceback."""
