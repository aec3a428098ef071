"""mqserve's control plane: the APIs and the registry they write.

``core`` is what every process shares (key schema, registry, liveness rule, settings,
frames, the request path); ``management``, ``inference``, ``metrics`` and ``jobs`` are
the HTTP APIs, wired by ``server``; ``archives`` is the model store; ``stack`` runs a
whole stack (``mqserve start``); ``cli`` is the command line. See docs/architecture.md.
"""
