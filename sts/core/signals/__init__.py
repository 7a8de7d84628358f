"""Shared Signals receiver: verify a pushed Security Event Token, then act on its CAEP events.

The SET on the wire (RFC 8417, pushed as RFC 8935 §2 describes), its media type,
CAEP event types and refusals are :mod:`sts.protocol.security_events`.  This
package is the pure part that decides, in the order the receiver runs it::

    step                                             where
    read the delivery (media type, body)             sts.protocol.security_events
    authenticate the transmitter (the JWS, RFC 8725) verify.authenticate_set
    check the claims (RFC 8417 §2.2)                 verify.check_set_claims
    parse the events, resolve their subjects         events.parse_events, subjects.resolve_subject
      (CAEP 1.0, RFC 9493 subject identifiers)
    single use of the jti (RFC 8417 §2.2)            receiver.SignalReceiver._receive
    apply each event to its subjects' state          events.apply_event (a pure transition),
                                                     stored by receiver.SignalReceiver._apply
    commit the audit record                          receiver.SignalReceiver._commit

Rate limits are checked on arrival and, once its signature names it, per transmitter.
:class:`~.receiver.SignalReceiver` runs them, talks to storage only through the
ports, and records every delivery, accepted or refused
(:class:`sts.core.audited.AuditedEndpoint`).  The HTTP layer (:mod:`sts.http.ssf`)
reads the request and writes the response; nothing here knows HTTP exists.

Decisions (see README "Shared signals"):

* A bad signature, an unknown ``kid``, or an ``alg`` outside the
  transmitter's allow-list (``none``, ``HS256``...) is ``invalid_key``: the SET
  signature is how a transmitter authenticates, and RFC 8935 defines
  ``invalid_key`` as "keys used to sign the SET [are] invalid or otherwise
  unacceptable".  ``authentication_failed`` is not used (no HTTP-level
  transmitter credential exists to fail).
* A second delivery of a ``jti`` is accepted (``202``, reason ``set.already_received``) and not
  applied again: the first one was applied, RFC 8417 §2.2 makes ``jti`` the replay guard, and a
  transmitter retrying a delivery whose answer it lost must not be told it failed.
* A subject the receiver cannot place (an ``iss_sub`` whose ``iss`` is no
  configured issuer, an unknown format, a ``complex`` subject without a
  usable member) refuses the whole SET with ``invalid_request``: accepting it
  silently would hide a misconfigured stream.  A subject outside a
  transmitter's ``subject_issuers`` is ``access_denied``.
* Unknown event types are accepted and ignored (RFC 8417 §2.2: a receiver
  ignores events it does not understand); they are named in the audit record.
* Revocation (``revoked_before``) takes effect at the time the SET is
  received, on this service's clock, not at the transmitter's
  ``event_timestamp``: every token issued before we could act is revoked, and
  the comparison is between two readings of the same clock.  Step-up
  (``reauth_after``) uses the event time: attestation issued after the event
  is fresh.
"""
