"""Prompt cleaning applied before tokenizing, as in Wan and diffusers' Wan pipelines."""

from __future__ import annotations

import html
import re

import ftfy

# The reference collapses `\s` of the `regex` package, which is Unicode's White_Space set. Python's `re` also
# counts the separators U+001C..U+001F as `\s`, so the set is spelled out instead.
_WHITESPACE_RUN = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_prompt(text: str) -> str:
    """Fix mojibake, unescape HTML (twice, for doubly escaped text), collapse whitespace runs to one space."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()
