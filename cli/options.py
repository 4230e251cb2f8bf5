"""One home for validating the command-line values of every command.

Numeric options are checked while parsing, by the ``type=`` functions below: a bad value ends the command with exit
code 2 and one line naming the option, the allowed range and the value (``argument --heat: must be a finite number
>= 0, got nan``). Relations between options (``--lower`` below ``--upper``, ``--map-range VMIN VMAX`` increasing) are
checked after parsing by :func:`check_order`. :class:`Parser` is the ``argparse.ArgumentParser`` of the command and
its sub-commands: its usage errors are one line on stderr (plus where to find help), never the full usage text.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Optional

from robustness_diag.exit_codes import EXIT_USAGE
from robustness_diag.text import printable

#: the largest seed accepted by every ``--seed`` (NumPy and torch generators take any seed in [0, 2**32 - 1])
MAX_SEED = 2 ** 32 - 1


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line: ``PROG: error: MESSAGE (see PROG --help)``, exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {printable(message)} (see '{self.prog} --help')\n")


def _number(text: str, kind: Callable, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {printable(text)!r}") from None
    return value


def finite_float(text: str) -> float:
    """Any finite number (no nan, inf)."""
    value = _number(text, float, "a finite number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {printable(text)}")
    return value


def float_range(low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False,
                high_open: bool = False) -> Callable[[str], float]:
    """A ``type=`` function for a finite number in the given range (open or closed at each end)."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    if low is not None and high is not None:
        what = (f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
    else:
        what = "a finite number " + " and ".join(parts) if parts else "a finite number"

    def check(text: str) -> float:
        value = _number(text, float, what)
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {what}, got {printable(text)}")
        return value
    check.__name__ = "number"
    return check


def int_range(low: Optional[int] = None, high: Optional[int] = None) -> Callable[[str], int]:
    """A ``type=`` function for an integer in ``[low, high]`` (either end may be open-ended: None)."""
    if low is not None and high is not None:
        what = f"an integer in [{low}, {high}]"
    elif low is not None:
        what = f"an integer >= {low}"
    elif high is not None:
        what = f"an integer <= {high}"
    else:
        what = "an integer"

    def check(text: str) -> int:
        value = _number(text, int, what)
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {printable(text)}")
        return value
    check.__name__ = "integer"
    return check


#: a finite number >= 0 (heat, ridge, thresholds)
non_negative = float_range(0.0)
#: a finite number > 0
positive = float_range(0.0, low_open=True)
#: a rate strictly between 0 and 1 (false-alarm rates)
probability = float_range(0.0, 1.0, low_open=True, high_open=True)
#: an integer >= 1 (sizes, counts, steps)
positive_int = int_range(1)
#: an integer >= 0 (margins, resample counts)
non_negative_int = int_range(0)
#: a seed: an integer in [0, MAX_SEED]
seed = int_range(0, MAX_SEED)


def device(text: str) -> str:
    """A ``--device`` value that :func:`robustness_diag.devices.resolve_device` accepts on this machine (kept as
    written; resolved again where the work runs)."""
    from robustness_diag.devices import resolve_device
    try:
        resolve_device(text)
    except ValueError as e:
        msg = str(e)
        prefix = f"--device {text}: "
        raise argparse.ArgumentTypeError(printable(msg[len(prefix):] if msg.startswith(prefix) else msg)) from None
    return text


def check_order(prog: str, low_name: str, low, high_name: str, high) -> Optional[str]:
    """The one-line usage error when ``low`` is not below ``high`` (both given), else None."""
    if low is None or high is None or low < high:
        return None
    return f"{prog}: error: {low_name} ({low:g}) must be below {high_name} ({high:g})"


def usage_error(message: str) -> int:
    """Prints ``message`` (one line, controls escaped) on stderr and returns the usage exit code."""
    print(printable(message), file=sys.stderr)
    return EXIT_USAGE


__all__ = ["Parser", "MAX_SEED", "finite_float", "float_range", "int_range", "non_negative", "positive",
           "probability", "positive_int", "non_negative_int", "seed", "device", "check_order", "usage_error"]
