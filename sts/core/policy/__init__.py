"""Policy: compiled rules that turn verified facts into a grant, or a refusal.

Rules are compiled once at start and frozen; evaluation is a pure function of
the request, the facts, the client and ``now``.  One module per step:

* :mod:`.matching` -- who a rule names: claim and identity matchers, anchored patterns;
* :mod:`.rules` -- the compiled values: :class:`~.rules.Rule`, what is asked
  (:class:`~.rules.PolicyRequest`) and what is granted (:class:`~.rules.Grant`);
* :mod:`.compile` -- schema-valid policy documents to rules: patterns and CEL
  conditions compiled, cross-references checked, a bad file refused with its
  file, rule and reason;
* :mod:`.index` -- the frozen :class:`~.index.PolicySet`, its rules indexed by
  issuer and by exact subject or literal subject prefix, so a request tries
  only the rules that could match it;
* :mod:`.evaluate` -- selection and refusals (RFC 8693 §2.2.2, RFC 6749 §5.2),
  and the per-rule trace of ``sts policy explain``.
"""
