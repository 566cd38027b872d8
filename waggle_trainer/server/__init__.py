"""The Argonne server: verify, aggregate and version the nodes' updates, broadcast
every new version, and show operators what every node is doing.

``waggle-trainer server --config FILE`` runs it (:mod:`.app`); the pieces are
described in ``docs/architecture.md`` and the wire in ``docs/protocol.md``.
"""
