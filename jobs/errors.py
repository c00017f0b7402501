"""Errors a user can fix; the CLI prints them as ``curate: error: …`` and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix (bad config, missing input); printed without a traceback."""
