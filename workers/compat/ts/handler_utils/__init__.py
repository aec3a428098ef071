"""TorchServe's ``ts.handler_utils``; only the ``timer`` decorator is provided."""
