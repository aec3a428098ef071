"""TorchServe's ``ts.protocol.otf_message_handler``, where older handlers import
``send_intermediate_predict_response`` from (``workers.handling.streaming``). The
backend wire protocol itself is not TorchServe's and is not provided."""

from workers.handling.streaming import send_intermediate_predict_response

__all__ = ["send_intermediate_predict_response"]
