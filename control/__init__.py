"""mqserve's control plane: the management API, the registry in Redis, the CLI.

``keys`` documents every Redis key; ``registry`` changes desired state atomically;
``service`` holds TorchServe's management semantics; ``management`` is the HTTP face.
"""
