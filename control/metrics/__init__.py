"""Metrics: the per-process recorder flushed to Redis (``recorder``), the Prometheus page
rendered from Redis (``render``) and the metrics port's app (``api``, port 8082).
"""
