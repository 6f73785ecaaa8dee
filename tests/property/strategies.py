"""Hypothesis strategies shared by the property tests: values canonical msgpack can carry."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

text = st.text(st.characters(codec="utf-8"), max_size=12)
ints = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
leaves = st.one_of(ints, text, st.binary(max_size=24), st.booleans())


def nested(depth: int) -> st.SearchStrategy[Any]:
    """Canonical values nested at most ``depth`` containers deep."""
    if depth == 0:
        return leaves
    inner = nested(depth - 1)
    return st.one_of(leaves, st.lists(inner, max_size=4),
                     st.dictionaries(text, inner, max_size=4))
