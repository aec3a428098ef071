"""A handler whose own dependency is missing: the error must not read as "no handler"."""

import mqserve_test_missing_dependency  # noqa: F401


def handle(data, context):
    return data
