"""Errors a user can fix, and the command-line wrapper that reports them as one line."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable


class IrisInputError(Exception):
    """Bad input (a missing dataset, a malformed file, ...): reported as one line, exit status 2."""


def brief(error: BaseException, limit: int = 200) -> str:
    """An exception's text for a one-line message: its first line, cut at a word with '...' when longer than
    `limit` (not mid-word: torch's long messages were cut mid-sentence)."""
    text = str(error).strip().splitlines()[0].strip() if str(error).strip() else type(error).__name__
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


def require_env_folder(name: str) -> str:
    """The folder named by environment variable `name` (nnUNet_raw, ...), or a clear error."""
    value = os.environ.get(name)
    if not value:
        raise IrisInputError(f"{name} is not set: export {name}=/path/to/folder (see README, 'Environment')")
    return value


def cli_entry(program: str) -> Callable[[Callable[..., int | None]], Callable[..., int]]:
    """Wrap a console-script main: IrisInputError -> 'program: error: ...' on stderr and exit 2."""

    def decorate(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs) or 0
            except IrisInputError as e:
                message = " ".join(str(e).split())  # one line, even when it quotes a multi-line exception
                print(f"{program}: error: {message}", file=sys.stderr)
                sys.exit(2)
            except KeyboardInterrupt:
                print(f"{program}: interrupted; finished work is kept, re-run to continue", file=sys.stderr)
                sys.exit(130)

        return wrapped

    return decorate
