"""mqserve's model workers and the per-host supervisor that reconciles them.

``supervisor`` decides (``plan``, a pure function) and applies the decisions to real
processes; each ``worker`` process loads one model version with TorchServe's handler
contract (``handling``, ``compat``) and serves its queues. See docs/architecture.md.
"""
