"""``python -m control.grpc``: both gRPC ports, with the settings the launcher wrote
(``$MQSERVE_SETTINGS``, as the gunicorn apps read them). Exits 0 after a graceful stop
(SIGTERM, SIGINT), 1 with a message when the settings are unusable or a port is taken.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from control.core.settings import SettingsError, settings_from_env
from control.grpc.server import serve


def main() -> int:
    """Run until stopped; the process's exit status."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s"
    )
    try:
        settings = settings_from_env()
        asyncio.run(serve(settings))
    except (RuntimeError, OSError, SettingsError) as exc:
        print(f"mqserve grpc: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
