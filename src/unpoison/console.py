"""What a user command tells its user: progress lines on stderr, and `UserError`, a mistake
in what the user gave (a path, a folder, a model), which `unpoison` prints and exits 2 on."""

from __future__ import annotations

import sys


class UserError(ValueError):
    """A problem with what the user gave (paths, folders, models): printed, exit code 2."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
