"""Declarative key maps.

A checkpoint format is described by a table of rules. Each rule matches a whole source key with a regular
expression, names the target key (a `re` replacement template, so `\\1` refers to a group) and optionally a
named transform applied to the tensor. Keys matched by an `ignore` pattern are dropped on purpose; any other
key that no rule matches is reported as unknown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import mlx.core as mx

Transform = Callable[[mx.array], mx.array]


@dataclass(frozen=True)
class Rule:
    source: str
    target: str
    transform: str | None = None


def conv3d_patch_to_linear(w: mx.array) -> mx.array:
    """torch Conv3d weight (O, I, kt, kh, kw) with kernel == stride -> Linear weight (O, kt*kh*kw*I).

    The input features are ordered (kt, kh, kw, I), matching channels-last patchification.
    """
    o = w.shape[0]
    return w.transpose(0, 2, 3, 4, 1).reshape(o, -1)


def drop_leading_unit_axis(w: mx.array) -> mx.array:
    if w.shape[0] != 1:
        raise ValueError(f"expected a leading axis of size 1, got shape {tuple(w.shape)}")
    return w[0]


COMMON_TRANSFORMS: dict[str, Transform] = {
    "conv3d_patch_to_linear": conv3d_patch_to_linear,
    "drop_leading_unit_axis": drop_leading_unit_axis,
}


class KeyMap:
    """Maps the keys (and tensors) of one source format onto the keys of one of our modules."""

    def __init__(
        self,
        rules: Iterable[Rule],
        ignore: Iterable[str] = (),
        transforms: Mapping[str, Transform] | None = None,
    ):
        self.rules = [(re.compile(r.source), r) for r in rules]
        self.ignore = [re.compile(p) for p in ignore]
        self.transforms = {**COMMON_TRANSFORMS, **(transforms or {})}
        for _, r in self.rules:
            if r.transform is not None and r.transform not in self.transforms:
                raise KeyError(f"rule {r.source!r} names unknown transform {r.transform!r}")

    def target(self, key: str) -> tuple[str, str | None] | None:
        """(target key, transform name) for a source key; None when the key is ignored or unknown."""
        for pattern, rule in self.rules:
            m = pattern.fullmatch(key)
            if m:
                return m.expand(rule.target), rule.transform
        return None

    def is_ignored(self, key: str) -> bool:
        return any(p.fullmatch(key) for p in self.ignore)

    def unknown_keys(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if self.target(k) is None and not self.is_ignored(k)]

    def apply(self, key: str, value: mx.array) -> tuple[str, mx.array] | None:
        """Convert one tensor; None when the key is ignored. Raises KeyError on an unknown key."""
        hit = self.target(key)
        if hit is None:
            if self.is_ignored(key):
                return None
            raise KeyError(key)
        new_key, transform = hit
        if transform is not None:
            value = self.transforms[transform](value)
        return new_key, value
