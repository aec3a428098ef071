"""Batch jobs from Python and from ``mqserve batch``, straight through Redis (no HTTP).

::

    client = BatchClient(Settings(redis_url="redis://localhost:6379/0"))
    job = client.submit("resnet", [{"data": ...}, ...])
    job.wait(timeout=600)
    for result in job.results():
        ...

The client writes the job and its queue messages exactly as the REST API does
(``control.jobs.store.JobStore``), so a job submitted here can be read over REST and the
other way round.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import click
import orjson
import redis

from control.core.errors import JobNotFoundException, ModelServerError
from control.core.home import Home
from control.core.redis_io import redis_client
from control.core.settings import Settings
from control.jobs.api import json_lines
from control.jobs.store import JobStatus, JobStore

#: Results fetched per round trip by :meth:`JobHandle.results`.
RESULTS_PAGE = 1000


class JobHandle:
    """One submitted job; every method reads Redis afresh."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self._store = store
        self.id = job_id

    def status(self) -> JobStatus:
        """The job's status; ``ResourceNotFoundException`` once it expired."""
        return self._store.status(self.id)

    def progress(self) -> tuple[int, int]:
        """``(items with a result, total items)``."""
        status = self.status()
        return status.done + status.failed, status.total

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> JobStatus:
        """Block until the job finished (succeeded, failed or cancelled); its status.

        Polls every ``poll`` seconds: a client convenience, cheap (one HGETALL) and
        free of any server-side state. Raises ``TimeoutError`` after ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if status.finished:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.id} still {status.status} after {timeout} s")
            time.sleep(poll)

    def results(self, page: int = RESULTS_PAGE) -> Iterator[dict[str, Any]]:
        """Every item's result in input order, fetched ``page`` at a time (see
        :meth:`JobStore.results`; items that have not run have ``"status": None``)."""
        offset: int | None = 0
        while offset is not None:
            batch, offset = self._store.results_page(self.id, offset, page)
            yield from batch

    def cancel(self) -> JobStatus:
        """Cancel the job unless it finished; the status afterwards."""
        return self._store.cancel(self.id)


class BatchClient:
    """Submits batch jobs for the stack whose Redis is ``settings.redis_url``."""

    def __init__(self, settings: Settings) -> None:
        if settings.redis_url is None:
            raise ValueError("settings.redis_url must be set")
        # Celery is imported here, not at module level: `mqserve --help` stays fast.
        from control.core.celery_app import make_celery

        self._redis = redis_client(settings.redis_url)
        self._celery = make_celery(settings)
        self._store = JobStore(self._redis, self._celery)

    def submit(self, model: str, inputs: Iterable[Any], version: str | None = None) -> JobHandle:
        """Submit each of ``inputs`` (JSON-encoded here) as one item of a new job."""
        return self.submit_encoded(model, [orjson.dumps(value) for value in inputs], version)

    def submit_encoded(
        self, model: str, items: Sequence[bytes], version: str | None = None
    ) -> JobHandle:
        """Submit items that already are JSON text (e.g. the lines of a JSON Lines file)."""
        return JobHandle(self._store, self._store.submit(model, version, items).job_id)

    def job(self, job_id: str) -> JobHandle:
        """Re-attach to a job by id (checked to exist)."""
        self._store.status(job_id)
        return JobHandle(self._store, job_id)

    def close(self) -> None:
        """Release the Redis and broker connections."""
        self._celery.close()
        self._redis.close()

    def __enter__(self) -> BatchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- mqserve batch -----------------------------------------------------------------------

EXIT_OK, EXIT_SOME_FAILED, EXIT_UNFINISHED = 0, 1, 2


def cli_settings(home: Path, redis_url: str | None) -> Settings:
    """``--redis-url`` if given, else the settings of the stack running in ``home``."""
    if redis_url is not None:
        return Settings(home=home, redis_url=redis_url)
    path = Home.at(home).settings_file
    try:
        settings = Settings.from_json(path.read_text())
    except OSError:
        raise click.ClickException(
            f"no running mqserve in {home} (no {path}); start one or pass --redis-url"
        ) from None
    if settings.redis_url is None:
        raise click.ClickException(f"{path} names no Redis; pass --redis-url")
    return settings


def run_batch(
    settings: Settings,
    model: str,
    inputs: Path,
    output: Path,
    version: str | None,
    timeout: float | None,
) -> int:
    """``mqserve batch``: submit, show progress, write results in order; the exit code.

    0 when every item succeeded, 1 when some failed, 2 when the job did not finish:
    timed out (it is then cancelled) or cancelled, the output holding what finished and
    the other items with ``"status": null``; or interrupted (Ctrl-C), which leaves the
    job running, writes no output and says how to reattach (:func:`run_attach`).
    """
    try:
        items = json_lines(inputs.read_bytes())
    except ModelServerError as exc:
        raise click.ClickException(f"{inputs}: {exc.message}") from None
    if not items:
        raise click.ClickException(f"{inputs} holds no inputs")
    try:
        with BatchClient(settings) as client:
            job = client.submit_encoded(model, items, version)
            # The id first, so that a user who interrupts the wait can reattach.
            click.echo(f"job {job.id}: {len(items)} items", err=True)
            return _finish(job, output, timeout)
    except ModelServerError as exc:
        raise click.ClickException(exc.message) from None
    except redis.RedisError as exc:
        raise click.ClickException(f"Redis failed: {exc}") from None


def run_attach(settings: Settings, job_id: str, output: Path, timeout: float | None) -> int:
    """``mqserve batch --attach JOB_ID``: wait for a job submitted earlier (by this
    command, REST or :class:`BatchClient`) as :func:`run_batch` waits for a new one, with
    the same progress, output and exit codes. An unknown or expired id raises a
    ``ClickException`` (exit code 1).
    """
    try:
        with BatchClient(settings) as client:
            try:
                job = client.job(job_id)
            except JobNotFoundException:
                raise click.ClickException(
                    f"no batch job {job_id[:64]}: the id is unknown, or the job expired "
                    "(jobs live in Redis for a day)"
                ) from None
            status = job.status()
            click.echo(
                f"job {job.id} ({status.model} {status.version}, {status.status}): "
                f"{status.done + status.failed} of {status.total} items finished",
                err=True,
            )
            return _finish(job, output, timeout)
    except ModelServerError as exc:
        raise click.ClickException(exc.message) from None
    except redis.RedisError as exc:
        raise click.ClickException(f"Redis failed: {exc}") from None


def _finish(job: JobHandle, output: Path, timeout: float | None) -> int:
    """Follow ``job`` to its end and write its results to ``output``; the exit code."""
    status = _follow(job, timeout)
    if status is None:
        click.echo(
            f"\ninterrupted; job {job.id} goes on running. Wait for it again with "
            f"`mqserve batch --attach {job.id} -o FILE`, or cancel it with "
            f"DELETE /jobs/{job.id}",
            err=True,
        )
        return EXIT_UNFINISHED
    with output.open("w", encoding="utf-8") as out:
        _write_results(job, out)
    return _summarise(status)


def _follow(job: JobHandle, timeout: float | None) -> JobStatus | None:
    """Show a progress bar until the job finished; its final status. Cancels the job on
    timeout; on ^C returns None and leaves the job running (to reattach to)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with click.progressbar(length=job.progress()[1], label="batch", file=sys.stderr) as bar:
        shown = 0
        try:
            while True:
                status = job.status()
                bar.update(status.done + status.failed - shown)
                shown = status.done + status.failed
                if status.finished:
                    return status
                if deadline is not None and time.monotonic() >= deadline:
                    click.echo(f"\ntimed out after {timeout:g} s; cancelling the job", err=True)
                    return job.cancel()
                time.sleep(0.2)
        except KeyboardInterrupt:
            return None


def _write_results(job: JobHandle, out: TextIO) -> None:
    for result in job.results():
        out.write(orjson.dumps(result).decode() + "\n")


def _summarise(status: JobStatus) -> int:
    if status.status not in ("succeeded", "failed"):
        click.echo(
            f"job {status.job_id} {status.status}: {status.done + status.failed} of "
            f"{status.total} items finished",
            err=True,
        )
        return EXIT_UNFINISHED
    if status.failed:
        click.echo(f"{status.failed} of {status.total} items failed", err=True)
        return EXIT_SOME_FAILED
    click.echo(f"all {status.total} items succeeded", err=True)
    return EXIT_OK
