"""Errors kvctl raises itself, beside the store's own `KVStoreError`s from the client.

`main` turns each into `kvctl: error: <message>` on stderr and its `exit_code`: 2 when the
command line has to change (a malformed key, a missing flag), 1 otherwise.
"""

from __future__ import annotations


class KvctlError(Exception):
    """A command could not run for a reason outside the node (a missing optional package)."""

    exit_code = 1


class UsageError(KvctlError):
    """The command line is malformed: a bad key, token list, file name or missing flag."""

    exit_code = 2
