"""TorchServe's ``ts.protocol``; only ``otf_message_handler``'s streaming call is provided."""
