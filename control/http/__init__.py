"""HTTP plumbing shared by the three ports: error rendering and capped body reading
(``common``), token authorization (``auth``), TorchServe's request parameters
(``params``), Netty's request limits and their JSON errors (``limits``), the gunicorn
worker classes that answer them (``asgi_worker``: uvicorn for inference and management;
``gunicorn_worker``: gthread for metrics) and the OpenAPI documents (``openapi``). The
apps themselves live in ``control.management``, ``control.inference``,
``control.metrics`` and ``control.jobs``; ``control.server`` wires them.
"""
