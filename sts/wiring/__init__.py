"""What ``create_app`` (:mod:`sts.app`) builds from the settings, once, at start.

One module per part: the trusted issuers, clients, transmitters and policy
(:mod:`.trust`), the shared stores and rate limits (:mod:`.stores`), the
pipeline's services (:mod:`.services`), the metadata document
(:mod:`.metadata`), the secrets kept beside the keys (:mod:`.secret_files`),
the review page (:mod:`.review`), the runtime every request uses
(:mod:`.runtime`) and the Flask application around them (:mod:`.web`).

Layer: above ``sts.http`` and the adapters, below ``sts.app`` and ``sts.cli``
(``tests/test_architecture.py``).
"""
