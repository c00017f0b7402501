"""Errors the command line turns into a one-line message instead of a traceback.

They live apart from ``jobs.cli`` so that ``python -m jobs.cli`` (where that module runs as
``__main__``, a second copy of it) catches the very class the commands raise.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix (bad config, missing input); printed without a traceback."""
