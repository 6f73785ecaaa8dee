"""The release decision for one candidate recipient of a publish, as the hub makes it and as the
auditor replays it from a ``route`` entry.

Pure. It is :func:`policies.decide.decide` plus the two checks that depend on the envelope rather
than the policy: a recipient without a certificate in the bundle is ``unknown_node``, and a
permitted recipient the sender did not seal a key for is ``no_key_for_recipient`` (it could not
read the message; delivering it would only leak metadata). Keeping both here means the broker and
the auditor cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Collection, Set

from policies.bundle import Bundle
from policies.cache import DecisionCache
from policies.decide import NO_KEY_FOR_RECIPIENT, Decision, decide
from policies.model import Label, NodeCert

UNKNOWN_NODE = "unknown_node"


def decide_recipient(
    label: Label,
    sender: NodeCert,
    recipient: str,
    topic: str,
    now_ms: int,
    bundle: Bundle,
    *,
    sealed_for: Collection[str] | None,
    inactive_nodes: Set[str] = frozenset(),
    cache: DecisionCache | None = None,
) -> Decision:
    """Decide whether a message may go to ``recipient``.

    ``sealed_for`` lists the recipients the envelope carries a key for; ``None`` is the ``route``
    dry run, where no envelope exists yet.
    """
    cert = bundle.nodes.get(recipient)
    if cert is None:
        return Decision.deny(UNKNOWN_NODE)
    if cache is not None:
        decision = cache.decide(label, sender, cert, topic, now_ms, bundle,
                                inactive_nodes=inactive_nodes)
    else:
        decision = decide(label, sender, cert, topic, now_ms, bundle,
                          inactive_nodes=inactive_nodes)
    if decision.permit and sealed_for is not None and recipient not in sealed_for:
        return decision.with_reason(NO_KEY_FOR_RECIPIENT)
    return decision
