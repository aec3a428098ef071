"""TorchServe's ``ts.metrics``: the metrics cache and the types handlers pass to it.

``dimension``, ``metric_type_enum``, ``caching_metric``, ``metric_cache_errors`` and
``metric_cache_yaml_impl`` re-export mqserve's implementation
(:mod:`workers.handling.metrics`), so a handler and its unit tests import them as they
would from TorchServe.
"""
