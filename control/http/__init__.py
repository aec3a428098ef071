"""HTTP plumbing shared by the three ports: error rendering and capped body reading
(``common``), token authorization (``auth``), TorchServe's request parameters
(``params``), the gunicorn worker class with JSON errors (``gunicorn_worker``) and the
OpenAPI documents (``openapi``). The apps themselves live in ``control.management``,
``control.inference``, ``control.metrics`` and ``control.jobs``; ``control.server`` wires them.
"""
