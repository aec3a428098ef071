"""The management API (port 8081): the Falcon ASGI resources (``api``), TorchServe's
management semantics over the registry (``service``, ``registration``), describe and
list in one Redis round trip each (``reads``), waits for workers (``waiting``) and a
Python client for it (``client``).
"""
