"""A function entry point: records each call and echoes every request's input."""

calls = []


def handle(data, context):
    calls.append((data, context))
    if data is None:
        return None
    return [row.get("body", row.get("data")) for row in data]


def shout(data, context):
    """Alternative entry point, selected with ``function_handler.py:shout``."""
    if data is None:
        context.metrics.add_counter("ShoutInitialized", 1)
        return None
    return [str(row.get("body")).upper() for row in data]
