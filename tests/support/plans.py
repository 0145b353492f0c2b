"""Reading a conversion plan in the tests: its components by name, what a component converts to, exact equality."""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def components(conversion) -> dict:
    """A planned conversion's components by name."""
    return {c.name: c for c in conversion.components}


def converted(comp) -> dict[str, np.ndarray]:
    """A planned component's tensors as the conversion writes them (read, transformed), in float32."""
    out = {}
    for target, (key, _, transform) in comp.tensors.items():
        value = comp.source.read(key)
        if transform is not None:
            value = comp.keymap.transforms[transform](value)
        out[target] = np.array(value.astype(mx.float32))
    return out


def assert_same(ours: dict, expected: dict, what: str) -> None:
    """The same keys and, key for key, the same values to the bit."""
    assert sorted(ours) == sorted(expected), what
    for key in expected:
        np.testing.assert_array_equal(ours[key], expected[key], err_msg=f"{what}: {key}")
