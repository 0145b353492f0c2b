"""Declarative key maps.

A checkpoint format is described by a table of rules. Each rule matches a whole source key with a regular
expression, names the target key (a `re` replacement template, so `\\1` refers to a group, or a function of the
match where an index must be shifted) and optionally a named transform applied to the tensor. Keys matched by an
`ignore` pattern are dropped on purpose; any other key that no rule matches is reported as unknown.
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
    target: str | Callable[[re.Match], str]
    transform: str | None = None


def conv3d_patch_to_linear(w: mx.array) -> mx.array:
    """torch Conv3d weight (O, I, kt, kh, kw) with kernel == stride -> Linear weight (O, kt*kh*kw*I).

    The input features are ordered (kt, kh, kw, I), matching channels-last patchification.
    """
    o = w.shape[0]
    return w.transpose(0, 2, 3, 4, 1).reshape(o, -1)


def conv3d_channels_last(w: mx.array) -> mx.array:
    """torch Conv3d weight (O, I, kt, kh, kw) -> MLX (O, kt, kh, kw, I)."""
    if w.ndim != 5:
        raise ValueError(f"expected a 5-D Conv3d weight, got shape {tuple(w.shape)}")
    return w.transpose(0, 2, 3, 4, 1)


def swap_halves(w: mx.array) -> mx.array:
    """(a; b) -> (b; a) along axis 0 (e.g. an adaLN projection stored as (scale, shift) against (shift, scale))."""
    first, second = mx.split(w, 2, axis=0)
    return mx.concatenate([second, first], axis=0)


def drop_leading_unit_axis(w: mx.array) -> mx.array:
    if w.shape[0] != 1:
        raise ValueError(f"expected a leading axis of size 1, got shape {tuple(w.shape)}")
    return w[0]


COMMON_TRANSFORMS: dict[str, Transform] = {
    "conv3d_patch_to_linear": conv3d_patch_to_linear,
    "drop_leading_unit_axis": drop_leading_unit_axis,
    "conv3d_channels_last": conv3d_channels_last,
    "swap_halves": swap_halves,
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
                return (m.expand(rule.target) if isinstance(rule.target, str) else rule.target(m)), rule.transform
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


class DroppingKeyMap(KeyMap):
    """A key map whose targets matching `drop` are left out on purpose (e.g. the decoder layers after the hidden
    state a text encoder takes, which our encoder does not build)."""

    def __init__(self, keymap: KeyMap, drop: Callable[[str], bool]):
        self.rules, self.ignore, self.transforms, self.drop = keymap.rules, keymap.ignore, keymap.transforms, drop

    def target(self, key: str):
        hit = super().target(key)
        return None if hit is not None and self.drop(hit[0]) else hit

    def is_ignored(self, key: str) -> bool:
        hit = super().target(key)
        return super().is_ignored(key) or (hit is not None and self.drop(hit[0]))


# ---------------------------------------------------------------------------------------------------
# Fused parameters. Where a checkpoint splits what our module holds fused (diffusers' separate q, k, v against
# one qkv projection), the rules send the pieces to part keys `name#0`, `name#1`, ...; `fuse_parts` joins them.

PART_SEPARATOR = "#"


def fuse_parts(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """Concatenate part keys `name#0`, `name#1`, ... (along axis 0) into `name`; other keys pass through.

    Raises ValueError when a fused parameter misses a part or also appears whole."""
    out: dict[str, mx.array] = {}
    parts: dict[str, dict[int, mx.array]] = {}
    for key, value in weights.items():
        name, sep, index = key.rpartition(PART_SEPARATOR)
        if sep:
            parts.setdefault(name, {})[int(index)] = value
        else:
            out[key] = value
    for name, pieces in parts.items():
        if name in out:
            raise ValueError(f"{name} is given both whole and in parts")
        if sorted(pieces) != list(range(len(pieces))):
            raise ValueError(f"{name}: parts {sorted(pieces)} are not 0..{len(pieces) - 1}")
        out[name] = mx.concatenate([pieces[i] for i in range(len(pieces))], axis=0)
    return out


def convert_weights(keymap: KeyMap, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """Apply `keymap` to every tensor (refusing unknown keys and collisions), then fuse part keys."""
    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        hit = keymap.apply(key, value)
        if hit is None:
            continue
        if hit[0] in out:
            raise ValueError(f"two source keys map onto {hit[0]}")
        out[hit[0]] = hit[1]
    return fuse_parts(out)


def is_part_key(key: str) -> bool:
    return re.search(rf"{re.escape(PART_SEPARATOR)}\d+$", key) is not None
