"""The shared core: what every process of mqserve relies on, and nothing else.

The Redis key schema (``keys``), the registry of desired state (``registry``, with the
version ``spec``), the observed worker records and the one liveness rule (``observed``),
Redis client construction (``redis_io``), settings (``settings``, ``metrics_schema``),
the request frame format (``envelope``) and the request path over Redis (``dispatch``),
the error hierarchy (``errors``), the stack's home directory (``home``), GPU discovery
(``devices``) and the Celery app both sides of a queue share (``celery_app``).

Rule: modules here import only each other (checked by the import contracts in
``pyproject.toml``); the APIs, the supervisor and the workers import the core.
"""
