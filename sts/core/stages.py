"""The names of the token-exchange pipeline's stages, and the default that times none of them.

The steps each stage runs are listed, in order, in :mod:`sts.core.exchange`.
The pipeline calls :meth:`~sts.core.ports.PipelineStages.enter` as it moves on;
the adapter behind the port (:mod:`sts.adapters.tracing`) turns the stages into
trace spans and reports each stage's duration to its observers (latency
histograms).  Without one, :data:`NO_STAGES` does nothing.
"""

from __future__ import annotations

PARSE = "parse"
CLIENT_AUTH = "client_auth"
DPOP = "dpop"
ATTEST = "attest"
POLICY = "policy"
RISK = "risk"
MINT = "mint"
AUDIT = "audit"

#: In pipeline order.
TOKEN_STAGES = (PARSE, CLIENT_AUTH, DPOP, ATTEST, POLICY, RISK, MINT, AUDIT)


class NoStages:
    """Times nothing."""

    def enter(self, stage: str) -> None:
        return None


NO_STAGES = NoStages()
