"""The ``mqserve`` command: TorchServe's ``torchserve --start|--stop`` as subcommands.

Settings are resolved here and nowhere else, in TorchServe's order of precedence:
defaults < the ``--ts-config`` properties file < command-line flags. ``MQSERVE_HOME``
(default ``~/.mqserve``) names the directory that holds the stack's data, sockets,
logs and key file. Every failure the operator can fix prints one line to stderr and
exits 1; tracebacks are for bugs only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import click

# control.stack.launcher (with Falcon, Celery and gunicorn behind it) and workers.supervisor.run are
# imported inside the commands that run them, so that `mqserve --help`, `mqserve batch`
# and the other commands load only what they use (tests/acceptance/test_cli_imports.py).
from control.core.settings import (
    Settings,
    SettingsError,
    apply_properties,
    read_properties,
    split_list,
    validate,
)

HOME_ENV = "MQSERVE_HOME"
DEFAULT_HOME = "~/.mqserve"
REDIS_SCHEMES = ("redis", "rediss", "unix")
#: Failures the operator can fix, printed as one line (see also :func:`stack_failures`).
FAILURES: tuple[type[Exception], ...] = (SettingsError, OSError)


def stack_failures() -> tuple[type[Exception], ...]:
    """:data:`FAILURES` and ``launcher.LaunchError``: what the commands running a stack catch.

    Imports the launcher, as only those commands do.
    """
    from control.stack import launcher

    return (*FAILURES, launcher.LaunchError)


def home_from_env() -> Path:
    """``$MQSERVE_HOME`` (or ``~/.mqserve``) as an absolute path."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().absolute()


def build_settings(
    ts_config: Path | None,
    model_store: Path | None = None,
    models: tuple[str, ...] = (),
    enable_model_api: bool = False,
    disable_token_auth: bool = False,
    redis_url: str | None = None,
) -> Settings:
    """Defaults, overlaid with the config file, overlaid with the flags; validated.

    ``models`` holds the raw ``--models`` values, each a comma-separated list. The
    flags ``enable_model_api`` and ``disable_token_auth`` can only switch a feature
    on, as in TorchServe; leaving them off keeps the config file's value.
    """
    settings = Settings(home=home_from_env())
    if ts_config is not None:
        settings = apply_properties(settings, read_properties(ts_config))
    changes: dict[str, Any] = {}
    if model_store is not None:
        changes["model_store"] = model_store
    if models:
        changes["load_models"] = tuple(entry for value in models for entry in split_list(value))
    if enable_model_api:
        changes["enable_model_api"] = True
    if disable_token_auth:
        changes["disable_token_authorization"] = True
    if redis_url is not None:
        changes["redis_url"] = redis_url
    settings = settings.replace(**changes)
    if settings.model_store is not None:
        store = settings.model_store.expanduser().absolute()
        if not store.is_dir():
            raise SettingsError(f"model_store {store} is not a directory")
        settings = settings.replace(model_store=store)
    check_startup(settings)
    return settings


def check_startup(settings: Settings) -> None:
    """:func:`validate`, plus what only a server start needs."""
    validate(settings)
    if "all" in settings.load_models and settings.model_store is None:
        raise SettingsError("load_models=all needs a model store (--model-store)")
    url = settings.redis_url
    if url is not None and url.partition("://")[0] not in REDIS_SCHEMES:
        raise SettingsError("--redis-url must be a redis://, rediss:// or unix:// URL")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """A TorchServe-compatible model server whose state lives in Redis.

    The stack's data, sockets, logs and key file live in $MQSERVE_HOME (default
    ~/.mqserve); run one stack per home.
    """


@cli.command()
@click.option("--model-store", type=click.Path(path_type=Path), help="Directory of archives.")
@click.option(
    "--ts-config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TS_CONFIG_FILE",
    help="TorchServe config.properties file (or $TS_CONFIG_FILE); flags override it.",
)
@click.option(
    "--models",
    multiple=True,
    help="Models to register at startup: all, file.mar or name=file.mar; comma-separated, "
    "repeatable, or several values after one --models as in torchserve.",
)
@click.argument("more_models", nargs=-1, metavar="")
@click.option(
    "--ncs",
    "--no-config-snapshots",
    is_flag=True,
    help="Accepted for TorchServe compatibility and ignored: mqserve keeps no config "
    "snapshots because the model registry itself persists in Redis.",
)
@click.option("--foreground", is_flag=True, help="Run in this terminal until ^C or SIGTERM.")
@click.option("--enable-model-api", is_flag=True, help="Allow registering and deleting models.")
@click.option(
    "--disable-token-auth", "--dt", is_flag=True, help="Serve without API keys (trusted nets)."
)
@click.option(
    "--redis-url",
    envvar="MQSERVE_REDIS_URL",
    help="Use this Redis (or $MQSERVE_REDIS_URL) instead of starting a private one.",
)
@click.option("--settings-file", type=click.Path(path_type=Path), hidden=True)
def start(
    model_store: Path | None,
    ts_config: Path | None,
    models: tuple[str, ...],
    more_models: tuple[str, ...],
    ncs: bool,
    foreground: bool,
    enable_model_api: bool,
    disable_token_auth: bool,
    redis_url: str | None,
    settings_file: Path | None,
) -> None:
    """Start the model server (detached unless --foreground)."""
    if more_models and not models:
        raise click.UsageError(f"unexpected argument {more_models[0]!r}")
    from control.stack import launcher

    try:
        if settings_file is not None:  # the detached runner: settings already resolved
            settings = Settings.from_json(settings_file.read_text())
        else:
            settings = build_settings(
                ts_config, model_store, models + more_models, enable_model_api,
                disable_token_auth, redis_url,
            )  # fmt: skip
        if foreground:
            logging.basicConfig(
                level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s"
            )
        code = launcher.start(settings, foreground)
    except stack_failures() as exc:
        raise click.ClickException(str(exc)) from exc
    raise SystemExit(code)


@cli.command()
def stop() -> None:
    """Stop the model server of $MQSERVE_HOME; exit 1 if it is not running."""
    from control.stack import launcher

    try:
        code = launcher.stop(home_from_env())
    except stack_failures() as exc:
        raise click.ClickException(str(exc)) from exc
    raise SystemExit(code)


@cli.command()
def status() -> None:
    """Print what runs (from the pid files); exit 0 only when every process is up."""
    from control.stack import launcher

    state, healthy = launcher.status(home_from_env())
    click.echo(f"mqserve is {state}")
    raise SystemExit(0 if healthy else 1)


@cli.command()
@click.option(
    "--ts-config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TS_CONFIG_FILE",
    help="TorchServe config.properties file.",
)
@click.option("--model-store", type=click.Path(path_type=Path), help="Directory of archives.")
@click.option("--redis-url", envvar="MQSERVE_REDIS_URL", help="The stack's Redis.")
@click.option("--models", multiple=True, help="Models to register at startup, as for start.")
@click.option("--enable-model-api", is_flag=True, help="Allow registering and deleting models.")
@click.option("--disable-token-auth", "--dt", is_flag=True, help="Serve without API keys.")
@click.option("--check", is_flag=True, help="Exit 0 when the API ports (HTTP and gRPC) answer.")
def api(
    ts_config: Path | None,
    model_store: Path | None,
    redis_url: str | None,
    models: tuple[str, ...],
    enable_model_api: bool,
    disable_token_auth: bool,
    check: bool,
) -> None:
    """Run the management, inference, metrics and gRPC APIs in the foreground (no supervisor).

    For a container or host that serves the APIs while supervisors run elsewhere
    against the same Redis; --redis-url is required.
    """
    from control.stack import launcher

    try:
        settings = build_settings(
            ts_config, model_store, models, enable_model_api, disable_token_auth, redis_url
        )
    except FAILURES as exc:
        raise click.ClickException(str(exc)) from exc
    if check:
        silent = launcher.api_answers(settings)
        click.echo("api is " + (f"not answering on {', '.join(silent)}" if silent else "up"))
        raise SystemExit(1 if silent else 0)
    if settings.redis_url is None:
        raise click.ClickException("mqserve api needs --redis-url (or $MQSERVE_REDIS_URL)")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s"
    )
    try:
        code = launcher.run(settings, with_supervisor=False)
    except stack_failures() as exc:
        raise click.ClickException(str(exc)) from exc
    raise SystemExit(code)


@cli.command()
@click.option(
    "--ts-config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TS_CONFIG_FILE",
    help="TorchServe config.properties file.",
)
@click.option(
    "--model-store",
    type=click.Path(path_type=Path),
    help="The model store, shared with the API hosts (e.g. a network volume).",
)
@click.option("--redis-url", envvar="MQSERVE_REDIS_URL", help="The stack's Redis.")
@click.option("--host-name", default=None, help="This host's name in Redis (default: hostname).")
@click.option(
    "--gpus",
    default=None,
    help="GPU ids to use, comma-separated (default: CUDA_VISIBLE_DEVICES or all).",
)
@click.option("--check", is_flag=True, help="Exit 0 when this host's supervisor is alive.")
@click.option("--settings-file", type=click.Path(path_type=Path), hidden=True)
def supervisor(
    ts_config: Path | None,
    model_store: Path | None,
    redis_url: str | None,
    host_name: str | None,
    gpus: str | None,
    check: bool,
    settings_file: Path | None,
) -> None:
    """Run this host's worker supervisor in the foreground (one per host).

    Extra hosts run only this command against the stack's Redis and model store.
    """
    from workers.supervisor import (
        run as workers_main,  # workers import torch lazily; keep CLI light
    )

    try:
        if settings_file is not None:
            settings = Settings.from_json(settings_file.read_text())
        else:
            settings = build_settings(ts_config, model_store, redis_url=redis_url)
    except FAILURES as exc:
        raise click.ClickException(str(exc)) from exc
    if settings.redis_url is None:
        raise click.ClickException("a supervisor needs --redis-url (or $MQSERVE_REDIS_URL)")
    host = host_name or workers_main.default_host_name()
    if check:
        alive = workers_main.check(settings.redis_url, host)
        click.echo(f"supervisor {host} is {'alive' if alive else 'not running'}")
        raise SystemExit(0 if alive else 1)
    devices = None if gpus is None else tuple(int(g) for g in split_list(gpus))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s"
    )
    workers_main.run_supervisor(settings, host, devices)


@cli.command()
@click.argument("model", required=False)
@click.argument(
    "inputs", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write one JSON result per input line, in input order.",
)
@click.option("--version", "model_version", default=None, help="Model version (default: default).")
@click.option(
    "--attach",
    metavar="JOB_ID",
    default=None,
    help="Wait for the job JOB_ID, submitted earlier, instead of submitting one (no MODEL "
    "or INPUTS then).",
)
@click.option("--redis-url", envvar="MQSERVE_REDIS_URL", help="Default: $MQSERVE_HOME's stack.")
@click.option("--timeout", type=float, default=None, help="Seconds before the job is cancelled.")
def batch(
    model: str | None,
    inputs: Path | None,
    output: Path,
    model_version: str | None,
    attach: str | None,
    redis_url: str | None,
    timeout: float | None,
) -> None:
    """Run INPUTS (JSON Lines, one input per line) through MODEL as a batch job.

    Prints the job's id, shows its progress and writes its results in input order.
    Ctrl-C leaves the job running: `mqserve batch --attach JOB_ID -o FILE` waits for it
    again (or for any job submitted over REST or from Python) and writes its results.

    Exit code 0 when every item succeeded, 1 when some failed (or for an unknown or
    expired JOB_ID), 2 when the job timed out (it is then cancelled), was cancelled or
    the wait was interrupted.
    """
    if attach is not None and (model is not None or model_version is not None):
        raise click.UsageError("--attach takes no MODEL, INPUTS or --version")
    if attach is None and (model is None or inputs is None):
        raise click.UsageError("give MODEL and INPUTS, or --attach JOB_ID")
    from control.jobs import client as batch_client  # imports Celery; keep the other commands light

    settings = batch_client.cli_settings(home_from_env(), redis_url)
    if model is not None and inputs is not None:
        code = batch_client.run_batch(settings, model, inputs, output, model_version, timeout)
    else:
        code = batch_client.run_attach(settings, attach or "", output, timeout)
    raise SystemExit(code)


def main() -> None:
    """Console-script entry point (``mqserve``)."""
    cli(prog_name="mqserve")


if __name__ == "__main__":
    main()
