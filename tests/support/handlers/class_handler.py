"""A single-class handler that exercises the context's per-request API.

Per request, headers ask for a response: ``x-status``/``x-phrase`` set the status,
``x-type`` the Content-Type, ``x-echo`` an ``x-echo`` response header.
"""

import json

from ts.context import Context


class EchoService:
    def __init__(self):
        self.initialized = False
        self.context = None

    def initialize(self, context: Context):
        self.initialized = True
        self.context = context

    def handle(self, data, context: Context):
        replies = []
        for idx, row in enumerate(data):
            status = context.get_request_header(idx, "x-status")
            if status:
                context.set_response_status(
                    int(status), context.get_request_header(idx, "x-phrase") or "", idx
                )
            if context.get_request_header(idx, "x-type"):
                context.set_response_content_type(idx, context.get_request_header(idx, "x-type"))
            if context.get_request_header(idx, "x-echo"):
                context.set_response_header(
                    idx, "x-echo", context.get_request_header(idx, "x-echo")
                )
            replies.append(
                json.dumps(
                    {
                        "id": context.get_request_id(idx),
                        "url_path": context.get_request_header(idx, "url_path"),
                        "inputs": sorted(row),
                    }
                )
            )
        return replies
