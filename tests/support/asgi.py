"""The ASGI management app over fakeredis, for the unit tier.

The app reads describe and list through an asyncio client (``redis.asyncio``) and runs
everything else through the service's sync client; here both are fakeredis clients of
one ``FakeServer``, as the two clients of a real API process share one Redis.
"""

from __future__ import annotations

from typing import Any

import fakeredis
import fakeredis.aioredis
from falcon import testing

from control.http.auth import KeyStore
from control.management.api import create_management_app
from control.management.reads import ManagementReads
from control.management.service import ManagementService


def async_twin(client: fakeredis.FakeRedis) -> fakeredis.aioredis.FakeRedis:
    """An asyncio bytes client of the same fake server as ``client``."""
    server = client.connection_pool.connection_kwargs["server"]
    return fakeredis.aioredis.FakeRedis(server=server)


def management_client(
    service: ManagementService,
    client: fakeredis.FakeRedis,
    keystore: KeyStore | None = None,
    **reads: Any,
) -> testing.TestClient:
    """A TestClient of the management app built as ``control.server.build_management``
    builds it: ``service`` runs over ``client``, describe and list over an asyncio twin of
    it (``reads``: more arguments of :class:`ManagementReads`, e.g. a dispatcher)."""
    app = create_management_app(
        service, keystore, reads=ManagementReads(async_twin(client), **reads)
    )
    return testing.TestClient(app)
