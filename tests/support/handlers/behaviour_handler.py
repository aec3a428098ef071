"""Returns or raises what the first request's JSON body asks for (error-path tests)."""

import torch
from ts.utils.util import PredictionException


class Unserialisable:
    pass


def _raise(exc):
    def fail(data, context):
        raise exc

    return fail


def _set_status(data, context):
    context.set_all_response_status(202, "Accepted later")
    return [{"ok": True} for _ in data]


MODES = {
    "raise": _raise(ValueError("handler bug")),
    "memory": _raise(MemoryError()),
    "cuda": _raise(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")),
    "prediction": _raise(PredictionException("input rejected", 422)),
    "not_list": lambda data, context: {"mode": "not_list"},
    "short": lambda data, context: data[1:],
    "unserialisable": lambda data, context: [Unserialisable() for _ in data],
    "tensor": lambda data, context: [torch.tensor([1.5, 2.5]) for _ in data],
    "bytes": lambda data, context: [bytearray(b"\x00\xffraw") for _ in data],
    "str": lambda data, context: ["h\u00e9llo" for _ in data],
    "status": _set_status,
}


def handle(data, context):
    if data is None:
        return None
    echo = lambda data, context: [row["body"] for row in data]  # noqa: E731
    return MODES.get(data[0]["body"]["mode"], echo)(data, context)
