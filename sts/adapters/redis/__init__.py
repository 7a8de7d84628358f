"""Redis adapters of the store ports, for a fleet of instances.

One module per concern; this package imports none of them:

* :mod:`.client`: the process's client, and a count of the connections it opens;
* :mod:`.epoch`: the replay ledger's epoch (whether Redis lost records);
* :mod:`.ledger`: the replay cache and the single-use ledger;
* :mod:`.persistence`: Redis's persistence settings, checked at start;
* :mod:`.key_value`: subject state, baselines, revoked tokens;
* :mod:`.rate_limits`: rate-limit state.
"""
