"""Rule 5 (accreditation dominates the label) against ../shared/vectors/accreditation_cases.json,
a neutral set derived from the OpenTDF access-decision tests and the XEP-0258 / SPIF rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from policies.decide import accreditation_dominates
from policies.model import Accreditation, Scheme, Tag

VECTORS = json.loads((Path(__file__).parent / "accreditation_cases.json").read_text())


def scheme_of(spec: dict[str, Any]) -> Scheme:
    tags = {name: Tag(name, tag["type"], tuple(sorted(tag["values"])))
            for name, tag in spec["tags"].items()}
    return Scheme(name="VECTORS", levels=tuple(spec["levels"]), tags=tags, identity=True)


SCHEME = scheme_of(VECTORS["scheme"])


def test_the_vector_file_has_cases_of_both_outcomes() -> None:
    outcomes = [case["expect"] for case in VECTORS["cases"]]
    assert len(outcomes) >= 15 and {"permit", "deny"} == set(outcomes)


@pytest.mark.parametrize("case", VECTORS["cases"], ids=[c["name"] for c in VECTORS["cases"]])
def test_accreditation_vector(case: dict[str, Any]) -> None:
    label, acc = case["label"], case["accreditation"]
    accreditation = Accreditation(max=acc["max"],
                                  cats={t: tuple(v) for t, v in acc["cats"].items()})
    cats = {tag: tuple(values) for tag, values in label["cats"].items()}
    got = accreditation_dominates(SCHEME, label["class"], cats, accreditation)
    assert ("permit" if got else "deny") == case["expect"]
