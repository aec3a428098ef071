"""The management API (port 8081): the Falcon resources (``api``), TorchServe's
management semantics over the registry (``service``, ``registration``), waits for
workers (``waiting``) and a Python client for it (``client``).
"""
