"""TorchServe's ``ts.handler_utils``: the ``timer`` decorator and ``utils``'s
``send_intermediate_predict_response`` (streaming) are provided."""
