"""TorchServe's gRPC APIs: inference on port 7070, management on 7071 (``grpc.aio``).

A second front end over the HTTP APIs' own operations, not a copy of them: predictions
go through :class:`control.core.dispatch.Dispatcher` as the HTTP inference port's do,
management calls through :class:`control.management.service.ManagementService` and
:class:`control.management.reads.ManagementReads`, keys through
:class:`control.http.auth.TokenAuth`. Every answer or error is the HTTP one translated
by TorchServe's rules (:mod:`control.grpc.status`).

``protos/``: the interface and its generated stubs; ``status``: HTTP status to gRPC code;
``auth``: the token interceptor; ``inference`` and ``management``: the servicers;
``server``: both servers in one asyncio process (``python -m control.grpc``, started
by ``mqserve start`` and ``mqserve api``); ``probe``: the readiness check.
"""
