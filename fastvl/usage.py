"""User mistakes on the command line: :class:`UsageError` (exit status 2, one line naming the flag or file) and
the argparse value types that reject out-of-range values before anything runs."""

from __future__ import annotations

import argparse
import math


class UsageError(Exception):
    """A bad argument, path, file or missing optional package: ``flag`` names what to fix (``--data``, the
    manifest path, ``run``); the CLI prints ``prog: error: FLAG: MESSAGE`` and exits with status 2."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag, self.message = flag, message


def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def int_at_least(low: int):
    """argparse type: an int >= ``low``."""

    def parse(text: str) -> int:
        value = _number(text, int, f"an integer >= {low}")
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


def float_above(low: float, *, inclusive: bool = False, high: float | None = None):
    """argparse type: a finite float > ``low`` (>= with ``inclusive``) and <= ``high`` when given."""
    op = ">=" if inclusive else ">"
    what = f"a number {op} {low:g}" + (f" and <= {high:g}" if high is not None else "")

    def parse(text: str) -> float:
        value = _number(text, float, what)
        if (value < low if inclusive else value <= low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = f"float{op}{low:g}"
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line plus a hint (no multi-line usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")
