"""The Redis key schema of mqserve: every key, its type and its lifetime, in one place.

Desired state (written by the management API, read by supervisors) lives under
``mqs:d:``; observed state (written by workers and supervisors, read by the API)
lives under ``mqs:o:``. Nothing under ``mqs:d:`` expires: registrations survive
restarts of every process (Redis runs with append-only persistence). Observed
keys carry TTLs so that a process that dies disappears by itself.

Model names and versions are validated (``control.core.spec``) so that neither can contain
``:``; the key segments below are therefore unambiguous.

Desired state
-------------
``mqs:d:models``                 ZSET   member = model name, score 0. Lexicographic
                                        order is TorchServe's list order.
``mqs:d:model:{name}``           HASH   ``default`` = default version.
``mqs:d:versions:{name}``        ZSET   member = version, score = registration sequence.
``mqs:d:version:{name}:{ver}``   HASH   ``spec`` = JSON ``ModelSpec``; ``min_workers``,
                                        ``max_workers`` (ints); ``generation`` (incremented
                                        on every change of the desired worker counts);
                                        ``registered_at`` (epoch seconds).
``mqs:d:seq``                    STRING registration sequence counter.
``mqs:d:rev``                    STRING registry revision: incremented by every write of desired
                                        state (register, scale, set-default, unregister), in
                                        the same script; a cheap "has anything changed" for
                                        readers. The request path caches nothing: its push
                                        script reads the registry itself
                                        (``control.core.dispatch``), so a write that has
                                        returned is seen by every later request.
``mqs:events``                   PUBSUB channel; ``{name}:{ver}`` is published after every
                                        change of desired state (a nudge, never the only signal).

Observed state
--------------
``mqs:o:worker-seq``             STRING counter for worker ids; ids start at 9000 like
                                        TorchServe's worker port numbers.
``mqs:o:worker:{wid}``           HASH   + TTL (3 x heartbeat). ``model``, ``version``, ``host``,
                                        ``pid``, ``gpu`` (-1 = CPU), ``state``
                                        (STARTING/LOADING/READY/BUSY/DRAINING/FAILED),
                                        ``started_at`` (epoch s), ``memory`` (RSS bytes),
                                        ``reason`` (failure text), ``heartbeat`` (epoch s),
                                        ``since`` (epoch s when ``state`` began), ``slot``
                                        (its replica slot, for adoption by a new supervisor);
                                        ``gpu_usage`` (describe's ``gpuUsage`` text, written
                                        only by the host's supervisor from its nvidia-smi
                                        samples, only while the hash exists).
``mqs:o:workers:{name}:{ver}``   SET    worker ids of one model version (an index; members
                                        whose hash has expired are pruned by readers).
``mqs:o:host:{host}``            HASH   + TTL: a live supervisor (``gpus``, ``heartbeat``).
``mqs:o:slot:{name}:{ver}:{i}``  STRING + TTL: the host holding replica slot ``i`` of a model
                                        version (a lease renewed by that host's supervisor;
                                        see ``workers.supervisor.plan``). Its worker reads it
                                        on every heartbeat and drains when another host holds
                                        it, or when it has been absent for ``orphan_grace`` s.
``mqs:o:held:{wid}``             STRING + TTL: the batch-job chunk worker ``wid`` is running,
                                        JSON ``{"job", "start", "end"}``; set when the chunk
                                        starts, deleted when it ends (TTL: longer than the
                                        slowest chunk). The supervisor that finds the worker
                                        dead requeues the chunk
                                        (``workers.worker.batch.requeue_held``).

Queues
------
Two queues per model version; the names say which (``online_queue``, ``batch_queue``):

``mqs:q:{name}:{ver}``           LIST   the ONLINE queue: inference requests from HTTP
                                        (``control.core.envelope`` frames). The API LPUSHes, workers
                                        BLMOVE from the right into their in-flight list (FIFO).
                                        Bounded by ``job_queue_size``; describe's
                                        ``jobQueueStatus`` and ``mqserve_queue_depth`` count it.
``mqs:o:inflight:{wid}``         LIST   + TTL: requests worker ``wid`` took and has not
                                        answered; answered with "Worker died." if it dies.
``mqs:r:{request_id}``           LIST   + TTL: the reply frame of one request (callers that
                                        wait on their own list: BLPOP, no polling).
``mqs:r:p:{listener}``           LIST   + TTL: the replies to every request one API process
                                        has waiting (``reply_to`` in the request frame; each
                                        reply names its request id). One task per process
                                        pops them all (``control.core.dispatch``).
``mqs:cancel:{request_id}``      STRING + TTL: set by the API when the client of a streamed
                                        answer went away; the worker's next intermediate
                                        send for that request sees it and stops the stream
                                        (``workers.worker.serving.ReplyStream``).
``mqs.q.{name}.{ver}``           LIST   the BATCH queue: the model version's Celery queue
                                        (kombu's list of task messages): batch-job chunks and
                                        Celery-native ``mqserve.predict`` tasks. Counted by
                                        ``mqserve_batch_queue_depth``, not by describe.

Batch jobs
----------
``mqs:job:{id}``                 HASH   + TTL: ``model``, ``version``, ``status``, ``total``,
                                        ``done``, ``failed``, ``created``, ``expires``,
                                        ``content_type``, ``batch_size``;
                                        ``requeued:{start}`` = times the chunk starting at
                                        item ``start`` was requeued after its worker died.
``mqs:job:{id}:items``           HASH   + TTL: item index -> input (raw bytes).
``mqs:job:{id}:results``         HASH   + TTL: item index -> result (JSON).

Metrics
-------
``mqs:m:{family}``               HASH   one metric family: series (labels as JSON) -> value;
                                        counters and histogram buckets summed over every
                                        process, gauges last-writer-wins
                                        (``control.metrics.recorder``).
``mqs:metric-families``          HASH   the catalogue of model (handler) metric families:
                                        family name -> JSON type, HELP and labels
                                        (``control.core.metrics_schema.family_json``), written by
                                        workers; families a metrics.yaml declares are
                                        overwritten, auto-detected ones set if absent.

Access control
--------------
``mqs:auth``                     HASH   ``{role}`` = SHA-256 hex digest of the role's key,
                                        ``{role}:expires`` = epoch seconds (absent: never).
                                        Roles: ``management``, ``inference``, ``API``.
"""

from __future__ import annotations

PREFIX = "mqs"

MODELS = f"{PREFIX}:d:models"
SEQ = f"{PREFIX}:d:seq"
REVISION = f"{PREFIX}:d:rev"
EVENTS = f"{PREFIX}:events"
WORKER_SEQ = f"{PREFIX}:o:worker-seq"
AUTH = f"{PREFIX}:auth"
METRIC_FAMILIES = f"{PREFIX}:metric-families"

#: First worker id handed out, as TorchServe's ``initial_worker_port``.
FIRST_WORKER_ID = 9000
#: Lifetime of a reply list (``reply``): its API process pops it long before.
REPLY_TTL_MS = 60_000


def model(name: str) -> str:
    """HASH with the model's ``default`` version."""
    return f"{PREFIX}:d:model:{name}"


def versions(name: str) -> str:
    """ZSET of the model's versions, scored by registration order."""
    return f"{PREFIX}:d:versions:{name}"


def version(name: str, ver: str) -> str:
    """HASH with one version's spec and desired worker counts."""
    return f"{PREFIX}:d:version:{name}:{ver}"


def worker(wid: str) -> str:
    """HASH (with TTL) describing one live worker process."""
    return f"{PREFIX}:o:worker:{wid}"


def workers(name: str, ver: str) -> str:
    """SET of worker ids serving one model version."""
    return f"{PREFIX}:o:workers:{name}:{ver}"


def host(hostname: str) -> str:
    """HASH (with TTL) announcing a live supervisor."""
    return f"{PREFIX}:o:host:{hostname}"


def slot(name: str, ver: str, index: int | str) -> str:
    """STRING lease: the host running replica ``index`` of one model version."""
    return f"{PREFIX}:o:slot:{name}:{ver}:{index}"


def batch_queue(name: str, ver: str) -> str:
    """The Celery queue (a Redis LIST of kombu messages) of one model version: batch jobs
    and Celery-native ``mqserve.predict`` calls. Not bounded by ``job_queue_size``."""
    return f"{PREFIX}.q.{name}.{ver}"


def online_queue(name: str, ver: str) -> str:
    """LIST of online inference request frames (HTTP predictions, describe) for one model
    version: what ``job_queue_size`` bounds and describe's ``jobQueueStatus`` counts."""
    return f"{PREFIX}:q:{name}:{ver}"


def inflight(wid: str) -> str:
    """LIST of request frames worker ``wid`` is working on."""
    return f"{PREFIX}:o:inflight:{wid}"


def held(wid: str) -> str:
    """STRING (with TTL): JSON ``{"job", "start", "end"}`` of the batch-job chunk worker
    ``wid`` is running."""
    return f"{PREFIX}:o:held:{wid}"


#: Every reply list begins so: a request frame's ``reply_to`` must name one.
REPLY_PREFIX = f"{PREFIX}:r:"


def reply(request_id: str) -> str:
    """LIST holding the reply frame of one request."""
    return f"{REPLY_PREFIX}{request_id}"


def replies(listener: str) -> str:
    """LIST of the replies to all requests of one API process (its reply listener)."""
    return f"{REPLY_PREFIX}p:{listener}"


def cancel(request_id: str) -> str:
    """STRING (with TTL): the client of streamed request ``request_id`` went away."""
    return f"{PREFIX}:cancel:{request_id}"


def job(job_id: str) -> str:
    """HASH describing one batch job."""
    return f"{PREFIX}:job:{job_id}"


def job_items(job_id: str) -> str:
    """HASH of a batch job's inputs, by item index."""
    return f"{PREFIX}:job:{job_id}:items"


def job_results(job_id: str) -> str:
    """HASH of a batch job's results (JSON), by item index."""
    return f"{PREFIX}:job:{job_id}:results"


def metrics(name: str) -> str:
    """HASH of one metric family's series, summed over processes."""
    return f"{PREFIX}:m:{name}"


def event(name: str, ver: str) -> str:
    """The payload published on :data:`EVENTS` after a desired-state change."""
    return f"{name}:{ver}"
