"""mqserve's stand-in for TorchServe's ``ts`` package: what handler code imports.

Provided: ``ts.context``, ``ts.torch_handler.base_handler``, ``ts.utils.util``,
``ts.metrics.dimension``, ``ts.metrics.metric_type_enum``, ``ts.handler_utils.timer``,
``send_intermediate_predict_response`` (streaming, from ``ts.handler_utils.utils`` and
``ts.protocol.otf_message_handler``) and ``ts.launcher`` (TorchServe's
``register_model`` helpers, ``start`` and ``stop``). ``ts.torch_handler.vision_handler``
and ``image_classifier`` need Pillow and torchvision. Envelopes and the other built-in
handlers are not provided.
"""

from workers.handling.loader import TORCHSERVE_VERSION

#: The TorchServe release whose handler API this package follows.
__version__ = TORCHSERVE_VERSION
