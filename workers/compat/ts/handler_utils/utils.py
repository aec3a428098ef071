"""TorchServe's ``ts.handler_utils.utils``: streaming intermediate results from a handler.

``send_intermediate_predict_response(ret, req_id_map, message, code, context)`` sends
``ret[idx]`` to request ``req_id_map[idx]`` at once (``workers.handling.streaming``).
"""

from workers.handling.streaming import send_intermediate_predict_response

__all__ = ["send_intermediate_predict_response"]
