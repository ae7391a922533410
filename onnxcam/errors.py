"""The one exception type that the CLI turns into a one-line message, and safe text for terminals."""

from __future__ import annotations

import re


class OnnxcamError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


# C0 and C1 controls, the bidirectional overrides and isolates (a name cannot reorder what a terminal shows), and
# lone surrogates (the bytes of a file name that are not UTF-8, as Python decodes them)
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` on one line with control characters escaped (a file name cannot fake a line or colour)."""
    return UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], str(text))


def describe(exc: BaseException, subject: object = None) -> str:
    """One line about a failure: an OnnxcamError's own message, else ``subject: Type: message``."""
    if isinstance(exc, OnnxcamError):
        return " ".join(str(exc).split())
    first = (str(exc).strip().splitlines() or [""])[0]
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"{subject}: {what}" if subject is not None else what
