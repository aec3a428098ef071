"""Built-in handlers (``ts.torch_handler``): base, vision and image classifier."""
