"""Checking a command before it reaches a model.

Commands come from planners and people over topics and services: they can be empty, huge, or
full of control characters. They are never file paths or instructions to the node: they are
only ever placed inside the grounding prompt as the thing to find.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from qwen3vl_seg_ros.types import InputError

_WHITESPACE = re.compile(r"\s+")


#: Unicode categories replaced by a space: control, format (zero-width, BOM, bidi), surrogate,
#: private use and unassigned characters.
_INVISIBLE = frozenset(("Cc", "Cf", "Cs", "Co", "Cn"))


def _clean(text: str) -> tuple[str, int]:
    """The text with control and format characters as spaces, whitespace collapsed; how many were replaced."""
    cleaned_chars = []
    removed = 0
    for ch in text:
        if unicodedata.category(ch) in _INVISIBLE and not ch.isspace():
            cleaned_chars.append(" ")
            removed += 1
        else:
            cleaned_chars.append(ch)
    return _WHITESPACE.sub(" ", "".join(cleaned_chars)).strip(), removed


def is_blank(text: str) -> bool:
    """Whether nothing of ``text`` is left once cleaned (spaces, a BOM, zero-width marks): a
    planner's "stop" may carry such characters, read from a file or typed in a terminal. It stops
    at the first visible character, so a huge command costs nothing here (its length is checked
    next)."""
    return all(ch.isspace() or unicodedata.category(ch) in _INVISIBLE for ch in text)


def clean_command(text: str, max_length: int) -> tuple[str, list[str]]:
    """Returns the command as the model will see it, and warnings about what was changed.

    Control and format characters (NUL, escape sequences, zero-width marks) are replaced by
    spaces and runs of whitespace collapsed; other Unicode (accents, CJK, emoji) is kept.
    Raises :class:`InputError` for commands that are empty or longer than ``max_length``.
    """
    if len(text) > max_length:
        raise InputError(
            f"command is {len(text)} characters long; the limit is max_command_length={max_length}"
        )
    warnings: list[str] = []
    cleaned, removed = _clean(text)
    if removed:
        warnings.append(f"removed {removed} control/format character(s) from the command")
    if not cleaned:
        raise InputError("command is empty: say what to find, e.g. 'the red mug' or 'all screwdrivers'")
    return cleaned, warnings


def markup_tokens(added_tokens: Iterable[str]) -> list[str]:
    """The tokenizer's added tokens that look like markup (``<|im_end|>``, ``<|image_pad|>``,
    ``<think>``): the ones a command must never contain. Added plain words are left alone."""
    return sorted({t for t in added_tokens if len(t) > 2 and t.startswith("<") and t.endswith(">")},
                  key=lambda t: (-len(t), t))


def markup_pattern(tokens: list[str]) -> re.Pattern[str] | None:
    """One pattern for ``tokens`` in the order :func:`markup_tokens` gives (longest first, so a
    token is never matched as a piece of a longer one); None for none. Built once per tokenizer."""
    return re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None


def strip_markup_tokens(text: str, pattern: re.Pattern[str] | None) -> tuple[str, list[str]]:
    """Returns the command without the tokenizer's control tokens (``pattern``, from
    :func:`markup_pattern`), and a warning if any were there.

    Why: the tokenizer reads ``<|im_end|>`` inside a command as the real control token, so a
    command could end the user's turn and write the model's answer for it, and ``<|image_pad|>``
    makes the processor fail on a count of image tokens. Each is replaced by a space, so pieces
    around a removed one cannot join into another token.
    """
    if pattern is None or "<" not in text:
        return text, []
    found = pattern.findall(text)
    if not found:
        return text, []
    cleaned = _WHITESPACE.sub(" ", pattern.sub(" ", text)).strip()
    names = ", ".join(sorted(set(found)))
    return cleaned, [f"removed {len(found)} tokenizer control token(s) from the command ({names})"]
