"""The inference API (port 8080): the Falcon resources (``api``) and health (``health``:
``/ping`` and KServe readiness). The request path itself is ``control.core.dispatch``.
"""
