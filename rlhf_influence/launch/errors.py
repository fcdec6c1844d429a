"""A recipe's refusals: the typed error raised inside the package and the one line,
``<recipe>: error: <why>``, with exit status 2, that each recipe's ``main`` turns it into."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import NoReturn

_program = "recipe"  # the running recipe's file name, which starts every message


def set_program(name: str) -> None:
    """Name the running recipe (``ppo_iif.py``) in its errors and notes."""
    global _program
    _program = name


def program() -> str:
    return _program


class RecipeError(Exception):
    """A job the recipe refuses, with the one line that says why (:func:`one_line_errors` prints it)."""


def fail(message: str) -> NoReturn:
    """Refuse the job with a clear one-line message (before any training, or with the rounds so far kept)."""
    raise RecipeError(message)


def one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
    """A recipe's ``main`` whose refusals (:class:`RecipeError`) end the program with their one line,
    ``<recipe>: error: <why>``, on stderr and exit status 2, as argparse's own errors do."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except RecipeError as exc:
            print(f"{_program}: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return run


def one_line(exc: BaseException) -> str:
    """An exception's whole message on one line, without a closing full stop."""
    return " ".join(str(exc).split()).rstrip(".")
