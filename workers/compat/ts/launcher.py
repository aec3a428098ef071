"""TorchServe's ``ts.launcher`` on mqserve: start and stop a server, register models.

::

    from ts.launcher import register_model
    response = register_model("iris", "iris.mar")
    assert response.status_code == 200
    print(response.json())

:func:`register_model` and :func:`register_model_with_params` send TorchServe's very
request (``POST /models`` with the parameters as the query string) and return its
``requests.Response``. Where TorchServe's always call ``http://localhost:8081`` without
a key, these find the management API and its key as ``control.management.client.find_management``
says: ``$MQSERVE_MANAGEMENT_URL`` and ``$MQSERVE_TOKEN``, else the address and key file
of the stack running in ``$MQSERVE_HOME`` (default ``~/.mqserve``), else
``http://127.0.0.1:8081``. Timeouts: 10 s to connect, 600 s to answer (a synchronous
registration answers once the model has loaded).

:func:`start` and :func:`stop` run ``mqserve start`` and ``mqserve stop`` for
``$MQSERVE_HOME`` with the same interpreter. ``import ts`` finds this package only when
TorchServe itself is not installed (see ``workers/compat/startup``).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import requests

from control.management.client import management_request, wait_for_management

#: How long :func:`start` waits for the management API once ``mqserve start`` returned.
ANSWER_TIMEOUT_S = 60.0


def stop() -> None:
    """``mqserve stop``; like TorchServe's, silent about a server that was not running."""
    subprocess.run([sys.executable, "-m", "control.cli", "stop"], check=False)


def start(
    model_store: str | None = None,
    snapshot_file: str | None = None,
    no_config_snapshots: bool = False,
    gen_mar: bool = True,
    plugin_folder: str | None = None,
    disable_token: bool = True,
    models: str | None = None,
    model_api_enabled: bool = True,
) -> None:
    """Restart the server as TorchServe's ``start`` does, returning once it answers.

    Stops a running server first, then runs ``mqserve start`` with ``--model-store``,
    ``--ts-config snapshot_file`` (a ``config.properties``), ``--ncs``,
    ``--disable-token-auth`` (on by default here, as in TorchServe's helper),
    ``--models`` and ``--enable-model-api`` (also on by default), and waits until the
    management API answers. Raises ``subprocess.CalledProcessError`` when ``mqserve
    start`` fails (its message is on stderr) and ``TimeoutError`` when the API stays
    silent.

    Differences from TorchServe's: ``gen_mar`` is ignored (TorchServe's generates its
    own test archives from its model zoo: put archives in ``model_store`` instead);
    ``plugin_folder`` raises ``ValueError`` (mqserve has no Java plugins); nothing is
    returned where TorchServe's returns a queue of the server's console lines
    (mqserve's logs are in ``$MQSERVE_HOME/logs``).
    """
    del gen_mar  # documented above: there is no model zoo to build archives from
    if plugin_folder:
        raise ValueError("mqserve has no plugins: plugin_folder is not supported")
    stop()
    cmd = [sys.executable, "-m", "control.cli", "start"]
    if model_store:
        cmd += ["--model-store", str(model_store)]
    if snapshot_file:
        cmd += ["--ts-config", str(snapshot_file)]
    if no_config_snapshots:
        cmd.append("--ncs")
    if disable_token:
        cmd.append("--disable-token-auth")
    if models:
        cmd += ["--models", models]
    if model_api_enabled:
        cmd.append("--enable-model-api")
    subprocess.run(cmd, check=True)
    wait_for_management(ANSWER_TIMEOUT_S)


def register_model_with_params(params: Any) -> requests.Response:
    """``POST /models`` with ``params`` (a dict or ``(name, value)`` pairs) as they are."""
    return management_request("POST", "/models", params)


def register_model(model_name: str, url: str) -> requests.Response:
    """Register ``url`` as ``model_name`` with one worker, answering once it serves."""
    params = (
        ("model_name", model_name),
        ("url", url),
        ("initial_workers", "1"),
        ("synchronous", "true"),
    )
    return register_model_with_params(params)
