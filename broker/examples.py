"""The demo coalition: five nations with their own classification schemes, tiered agreements.

This is the coalition ``coalition demo`` runs and ``policies/examples/`` holds, signed with
throwaway trial keys. Regenerate the committed copy with::

    .venv/bin/python -m broker.examples policies/examples

Nations and their schemes (each mapped to the common scheme NATO, which has the restrictive
need-to-know tag ``NTK``):

======  ==================================================================================
DEU     VS-NUR FÜR DEN DIENSTGEBRAUCH / VS-VERTRAULICH / GEHEIM / STRENG GEHEIM
FRA     DIFFUSION RESTREINTE / CONFIDENTIEL / SECRET / TRÈS SECRET (tag ``BESOIN`` → NTK)
GBR     OFFICIAL / OFFICIAL-SENSITIVE / SECRET / TOP SECRET
POL     ZASTRZEŻONE / POUFNE / TAJNE / ŚCIŚLE TAJNE
USA     UNCLASSIFIED / CONFIDENTIAL / SECRET / TOP SECRET
======  ==================================================================================

Agreements: :data:`ATLANTIC_SHIELD` (maritime; a ``core`` tier up to SECRET, a ``partners``
tier up to RESTRICTED with no need-to-know material), :data:`EASTERN_SENTRY` (land; one
``inner`` tier up to SECRET) and :data:`RHINE_LIAISON` (the only FRA–DEU agreement, expired).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from broker.coalition import (
    DAY_MS,
    Coalition,
    CoalitionDocuments,
    NodeSpec,
    build_coalition,
    coalition_documents,
    default_common_scheme,
    write_documents,
    write_keys,
)
from policies.model import RESTRICTIVE, Agreement, Scheme, Tag, Tier

NATIONS = ("DEU", "FRA", "GBR", "POL", "USA")
COMMUNITIES: Mapping[str, tuple[str, ...]] = {"NATO": NATIONS}
COMMON = default_common_scheme("NATO")
NTK = "NTK"
COMMON_LEVELS = COMMON.levels  # UNCLASSIFIED, RESTRICTED, CONFIDENTIAL, SECRET, TOP SECRET

#: Agreement ids, and the tiers the demo names in its output.
ATLANTIC_SHIELD = "ATLANTIC-SHIELD"
EASTERN_SENTRY = "EASTERN-SENTRY"
RHINE_LIAISON = "RHINE-LIAISON"
CORE_TIER = "core"
PARTNER_TIER = "partners"
INNER_TIER = "inner"

#: The offline gateway (its queue is delivered in precedence order when it comes back) and the
#: gateway whose certificate has expired.
OFFLINE_NODE = "USA-GW2"
EXPIRED_NODE = "FRA-GW9"


def _national_scheme(nation: str, levels: Sequence[str], ntk_tag: str = NTK) -> Scheme:
    """A four-level national scheme mapped onto RESTRICTED…TOP SECRET (USA: its UNCLASSIFIED
    onto UNCLASSIFIED, it has no RESTRICTED), with a restrictive need-to-know tag whose
    values ALPHA and BRAVO map to the common ones of the same name."""
    targets = (("UNCLASSIFIED",) if nation == "USA" else ("RESTRICTED",)) + COMMON_LEVELS[2:]
    values = ("ALPHA", "BRAVO")
    return Scheme(
        name=nation, levels=tuple(levels),
        tags={ntk_tag: Tag(ntk_tag, RESTRICTIVE, values)},
        level_map=dict(zip(levels, targets, strict=True)),
        tag_map={ntk_tag: NTK},
        value_map={ntk_tag: {v: (v,) for v in values}},
    )


def national_schemes() -> dict[str, Scheme]:
    """Every nation's own scheme with its equivalence to the common scheme."""
    gbr = _national_scheme("GBR", ("OFFICIAL", "OFFICIAL-SENSITIVE", "SECRET", "TOP SECRET"))
    # GBR OFFICIAL is unclassified in common terms: the only level below RESTRICTED.
    gbr = dataclasses.replace(gbr, level_map={**gbr.level_map, "OFFICIAL": "UNCLASSIFIED",
                                              "OFFICIAL-SENSITIVE": "RESTRICTED"})
    return {
        "DEU": _national_scheme("DEU", ("VS-NUR FÜR DEN DIENSTGEBRAUCH", "VS-VERTRAULICH",
                                        "GEHEIM", "STRENG GEHEIM")),
        "FRA": _national_scheme("FRA", ("DIFFUSION RESTREINTE", "CONFIDENTIEL", "SECRET",
                                        "TRÈS SECRET"), ntk_tag="BESOIN"),
        "GBR": gbr,
        "POL": _national_scheme("POL", ("ZASTRZEŻONE", "POUFNE", "TAJNE", "ŚCIŚLE TAJNE")),
        "USA": _national_scheme("USA", ("UNCLASSIFIED", "CONFIDENTIAL", "SECRET",
                                        "TOP SECRET")),
    }


def agreements(now_ms: int) -> tuple[Agreement, ...]:
    """Two active tiered agreements and one that expired a month before ``now_ms``."""
    year = 365 * DAY_MS
    active = {"not_before": now_ms - DAY_MS, "not_after": now_ms + year}
    return (
        Agreement(
            id=ATLANTIC_SHIELD, version=3, purpose="Maritime situational awareness, North Atlantic",
            parties=("FRA", "GBR", "POL", "USA"), **active,
            tiers=(
                Tier(CORE_TIER, ("FRA", "GBR", "USA"), "SECRET", topics=("maritime.>",)),
                Tier(PARTNER_TIER, ("POL",), "RESTRICTED", categories={NTK: ()},
                     topics=("maritime.>",)),
            ),
        ),
        Agreement(
            id=EASTERN_SENTRY, version=1, purpose="Land forces on the eastern flank",
            parties=("DEU", "GBR", "POL", "USA"), **active,
            tiers=(Tier(INNER_TIER, ("DEU", "GBR", "POL", "USA"), "SECRET", topics=("land.>",)),),
        ),
        Agreement(
            id=RHINE_LIAISON, version=2, purpose="Franco-German liaison (expired, not renewed)",
            parties=("DEU", "FRA"), not_before=now_ms - year, not_after=now_ms - 30 * DAY_MS,
            tiers=(Tier("bilateral", ("DEU", "FRA"), "SECRET"),),
        ),
    )


def nodes(now_ms: int) -> tuple[NodeSpec, ...]:
    """One gateway per nation, a second (offline) USA gateway, and a FRA gateway whose
    certificate expired yesterday. Accreditations are in each nation's own scheme."""
    return (
        NodeSpec("DEU-GW1", "DEU", "GEHEIM", {NTK: ["ALPHA"]}),
        NodeSpec("FRA-GW1", "FRA", "SECRET", {"BESOIN": ["BRAVO"]}),
        NodeSpec(EXPIRED_NODE, "FRA", "SECRET", not_before_ms=now_ms - 30 * DAY_MS,
                 not_after_ms=now_ms - DAY_MS),
        NodeSpec("GBR-GW1", "GBR", "SECRET", {NTK: ["ALPHA"]}),
        NodeSpec("POL-GW1", "POL", "TAJNE", {NTK: ["ALPHA"]}),
        NodeSpec("USA-GW1", "USA", "TOP SECRET", {NTK: ["ALPHA", "BRAVO"]}),
        NodeSpec(OFFLINE_NODE, "USA", "SECRET", {NTK: ["ALPHA", "BRAVO"]}),
    )


def example_documents(now_ms: int) -> CoalitionDocuments:
    """The demo coalition's signed documents and fresh keys, in memory."""
    return coalition_documents(
        nations=NATIONS, nodes=nodes(now_ms), now_ms=now_ms, communities=COMMUNITIES,
        common=COMMON, schemes=national_schemes(), agreements=agreements(now_ms),
    )


def build_example_coalition(base: Path, now_ms: int) -> Coalition:
    """Write the demo coalition under ``base`` (``policy/`` and ``keys/``, as
    :func:`broker.coalition.build_coalition` does)."""
    return build_coalition(
        base, nations=NATIONS, nodes=nodes(now_ms), now_ms=now_ms, communities=COMMUNITIES,
        common=COMMON, schemes=national_schemes(), agreements=agreements(now_ms),
    )


# --- the committed copy (policies/examples/) ---------------------------------------------------

#: What :func:`write_examples` owns in its target directory (and replaces on regeneration).
GENERATED = ("trust-root.toml", "trust-root.toml.sig", "schemes", "nodes", "agreements", "keys",
             "README.md")
REGENERATE = ".venv/bin/python -m broker.examples policies/examples"


def write_examples(target: Path, now_ms: int) -> CoalitionDocuments:
    """Write the demo coalition as a policy directory at ``target``: the documents and their
    ``.sig`` files, the trial keys in ``keys/`` and a README. What an earlier run generated
    there (the names in :data:`GENERATED`) is replaced; nothing else is touched.

    Raises :class:`FileExistsError` for a non-empty directory without a ``trust-root.toml``:
    a mistyped target must not lose its ``README.md`` or ``keys/``.
    """
    if target.is_dir() and any(target.iterdir()) and not (target / "trust-root.toml").is_file():
        raise FileExistsError(f"{target} is not empty and is not a policy directory; "
                              "refusing to replace files in it")
    made = example_documents(now_ms)
    target.mkdir(parents=True, exist_ok=True)
    for name in GENERATED:
        old = target / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    write_documents(made.documents, target)
    write_keys(made, target / "keys")
    (target / "README.md").write_text(readme(made, now_ms), encoding="utf-8")
    return made


def readme(made: CoalitionDocuments, now_ms: int) -> str:
    """The README of the generated directory: what it is, what is in it, how to remake it."""
    generated = time.strftime("%Y-%m-%d", time.gmtime(now_ms / 1000))
    listing = "\n".join(f"- `{path}` (+ `.sig`)" for path in sorted(made.documents))
    return _README.format(generated=generated, listing=listing, regenerate=REGENERATE,
                          root=made.root_sha256.hex(), broker=made.broker_name)


_README = """\
# The demo coalition's policy documents

Generated on {generated} by `broker/examples.py` (the coalition `coalition demo` runs). It is a
complete, signed policy directory: `coalition policy check policies/examples` loads it, and a
broker can serve it (pin the trust root below). The formats are described in
[docs/policy.md](../../docs/policy.md).

**The keys in `keys/` are throwaway trial keys**, generated at random for this example and
committed only so that the documents can be edited, re-signed (`coalition policy sign`) and
served with real gateways. They protect nothing; never use them, or documents they signed,
outside a demonstration.

- Nations: DEU, FRA, GBR, POL, USA, each with its own classification scheme and its
  equivalence to the common scheme NATO (non-ASCII level names such as `TRÈS SECRET`,
  `VS-NUR FÜR DEN DIENSTGEBRAUCH` and `ŚCIŚLE TAJNE` are UTF-8, NFC).
- Agreements: `ATLANTIC-SHIELD` (tiers `core` up to SECRET and `partners` up to RESTRICTED with
  no need-to-know material, maritime topics), `EASTERN-SENTRY` (tier `inner` up to SECRET, land
  topics), `RHINE-LIAISON` (FRA–DEU, **expired** a month before generation).
- Node certificates are valid for a year from generation, except `FRA-GW9`, which had already
  expired; agreements and certificates go out of date, so regenerate rather than extend them.
- Broker `{broker}`, key `keys/broker.key`. The trust root's SHA-256, which a
  broker's configuration pins as `[policy] trust_root_sha256`:

      {root}

Documents:

{listing}

Regenerate (new keys, new signatures, validity counted from today):

    {regenerate}
"""


def _midnight_utc(now_ms: int) -> int:
    return now_ms - now_ms % DAY_MS


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m broker.examples DIR``: write the demo coalition's documents to ``DIR``."""
    parser = argparse.ArgumentParser(prog="python -m broker.examples", description=main.__doc__)
    parser.add_argument("target", type=Path, help="directory to (re)generate, e.g. "
                        "policies/examples")
    args = parser.parse_args(argv)
    try:
        made = write_examples(args.target, _midnight_utc(time.time_ns() // 1_000_000))
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(made.documents)} signed documents and {len(made.nodes)} node keys to "
          f"{args.target}; trust root SHA-256 {made.root_sha256.hex()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
