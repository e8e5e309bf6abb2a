"""Every Redis key, stream, consumer group, channel and fixed TTL the system uses.

Nothing else builds a key by hand: a process that needs one calls a function here, so a reader
can see the whole data layout in one page.
"""

from __future__ import annotations

from typing import Literal

PREFIX = "ai"

# The one consumer group every batcher of a model joins on its streams.
BATCHER_GROUP = "batchers"

# A dispatched batch's entries are pending on the consumer of the worker that holds it, so the
# group's pending list says which worker holds which entry. Any other consumer is a batcher's
# (or the single "inflight" consumer of older versions), and only the lease holder's is live.
WORKER_CONSUMER_PREFIX = "w:"


def worker_consumer(worker_id: str) -> str:
    """The stream consumer owning the entries of batches dispatched to one worker process."""
    return f"{WORKER_CONSUMER_PREFIX}{worker_id}"


def worker_of_consumer(consumer: str) -> str | None:
    """The worker id behind a worker consumer name; None for any other consumer."""
    if consumer.startswith(WORKER_CONSUMER_PREFIX):
        return consumer[len(WORKER_CONSUMER_PREFIX):]
    return None

# Pub/sub channel carrying every job that reached a final state (long-poll wake-ups): "id", or
# "id\n" + the record as JSON when its output is at most PUBLISH_RECORD_MAX_BYTES, so that a
# waiting request answers without reading the record back.
FINAL_CHANNEL = f"{PREFIX}:ev:final"
PUBLISH_RECORD_MAX_BYTES = 65_536

# Channel prefix on which a cancel announces the job it removed (its id), per model, so the
# batcher drops the job's entry from its read-ahead before it reaches a batch.
CANCEL_CHANNEL_PREFIX = f"{PREFIX}:ev:cancel:"


def cancel_channel(model: str) -> str:
    return f"{CANCEL_CHANNEL_PREFIX}{model}"


# Pub/sub channel carrying the id of every watched job (an SSE client follows it, or its webhook
# wants "running") when a worker starts it.
RUNNING_CHANNEL = f"{PREFIX}:ev:running"


# Caps on auxiliary streams; approximate trimming keeps them bounded without a sweeper.
COMPLETIONS_MAXLEN = 10_000
DEAD_LETTER_MAXLEN = 10_000
SCALE_HISTORY_LEN = 20

# Fixed lifetimes (the configurable ones live in Settings).
BATCHER_STATE_TTL_S = 15
# A heartbeat's record (for display and the autoscaler) outlives its liveness key this many
# times, so a dead worker stays visible as gone for a moment instead of vanishing.
HEARTBEAT_RECORD_FACTOR = 5
CANCELED_TTL_S = 3600

PriorityName = Literal["high", "normal", "low"]
# Dispatch order: a model has one stream per priority, read high first.
PRIORITIES: tuple[PriorityName, ...] = ("high", "normal", "low")


JOB_PREFIX = f"{PREFIX}:job:"


def job(job_id: str) -> str:
    """Hash holding one job record."""
    return f"{JOB_PREFIX}{job_id}"


def stream(model: str, priority: PriorityName) -> str:
    """Request stream of one model and priority; entries carry job id, rows, expiry."""
    return f"{PREFIX}:q:{model}:{priority}"


def streams(model: str) -> list[str]:
    """The model's request streams, in PRIORITIES order."""
    return [stream(model, p) for p in PRIORITIES]


def due(model: str, priority: PriorityName) -> str:
    """Sorted set of the model's queued jobs of one priority, scored by due time (epoch ms: the
    job's deadline, else its submit + max_latency_ms): the batcher's order within the class,
    from which a job's position, ETA and the admission of a deadline are computed. A job leaves
    it when a worker starts it or it ends."""
    return f"{PREFIX}:due:{model}:{priority}"


# A due set expires this long after its longest-lived job would: each submit then extends it
# about once a minute rather than every time (a PTTL and a PEXPIREAT per submit).
DUE_SLACK_MS = 60_000


def dues(model: str) -> list[str]:
    """The model's due sets, in PRIORITIES order."""
    return [due(model, p) for p in PRIORITIES]


def completions(model: str) -> str:
    """Stream of batch completion reports (size, duration) that feed the batcher's latency fit."""
    return f"{PREFIX}:done:{model}"


def dead_letters(model: str) -> str:
    """Stream of jobs that failed after the attempt limit."""
    return f"{PREFIX}:dlq:{model}"


def workers(model: str) -> str:
    """Hash worker name -> heartbeat JSON (with its own expiry time) for one model."""
    return f"{PREFIX}:workers:{model}"


def alive(model: str, worker_id: str) -> str:
    """Set by a worker on every heartbeat with an expiry of the liveness lapse: while it exists,
    the worker lives. Expired on the Redis server's clock, so hosts' clocks never matter."""
    return f"{PREFIX}:alive:{model}:{worker_id}"


def batcher_state(model: str) -> str:
    """JSON snapshot of the batcher's live values (fit, queue, in flight)."""
    return f"{PREFIX}:batcher:{model}"


def lease(model: str) -> str:
    """The active batcher's lease on a model: "holder/epoch" (see batcher.lease)."""
    return f"{PREFIX}:lease:{model}"


def lease_epoch(model: str) -> str:
    """Counter of a model's leadership terms; every new lease takes the next value (fencing)."""
    return f"{PREFIX}:epoch:{model}"


def idempotency(owner: str, model: str, key_digest: str) -> str:
    """Maps an Idempotency-Key (its sha256 hex digest) of one caller (API key owner, '-' when
    authentication is off) and model to the job ids and request body hash it created."""
    return f"{PREFIX}:idem:{owner or '-'}:{model}:{key_digest}"


def owner_queue(model: str, owner: str) -> str:
    """Sorted set of the jobs one API key owner has queued for a model (score: the job's queue
    deadline, epoch ms); entries that started, ended or expired are pruned lazily at submit."""
    return f"{PREFIX}:owned:{model}:{owner}"


# Entries of an owner queue a submit over the per-key limit checks, oldest first, at least.
OWNER_PRUNE_MIN = 128


def stats(model: str) -> str:
    """Hash status -> count of jobs of the model that reached each final state (for /metrics)."""
    return f"{PREFIX}:stats:{model}"


STATS_PREFIX = f"{PREFIX}:stats:"


def job_latencies(model: str) -> str:
    """Hash of the model's job latency histograms (run, end to end), summed over all workers:
    field `NAME:INDEX` counts one bucket, `NAME:sum` the seconds (see shared.histograms)."""
    return f"{PREFIX}:latency:{model}"


def answer_leg(model: str) -> str:
    """Hash gateway process -> its 99th percentile of the model's answer leg, final write to the
    answer of a waiting client (expiring entries, see shared.answerleg)."""
    return f"{PREFIX}:answer-leg:{model}"


# A gateway that stopped answering (or died) stops counting this long after its last publish.
ANSWER_LEG_TTL_S = 30


def metrics_exporter() -> str:
    """Which gateway replica exports the system-wide series on /metrics (its process id),
    renewed at each of its scrapes: one exporter, so summing over replicas never counts twice."""
    return f"{PREFIX}:metrics-exporter"


# Longer than any sane scrape interval (Prometheus' default is 1 min): the exporter keeps it by
# being scraped; another replica takes over this long after it stopped.
METRICS_EXPORTER_TTL_S = 150


def webhooks() -> str:
    """Stream of jobs whose final state must be POSTed to their webhook URL."""
    return f"{PREFIX}:webhooks"


WEBHOOK_GROUP = "webhooks"
WEBHOOKS_MAXLEN = 100_000


def scale_history(model: str) -> str:
    """List of the autoscaler's last decisions for a model, newest first."""
    return f"{PREFIX}:scale:{model}"


def worker_queue(model: str, worker_id: str) -> str:
    """The Celery queue of one worker process: the batcher routes each batch to the worker it
    chose, so it always knows which worker holds which batch."""
    return f"{PREFIX}.batches.{model}.{worker_id}"


# kombu's Redis transport keeps a queue as a list named after it (one more per priority step,
# name + KOMBU_PRIORITY_SEP + step) and its exchange bindings in sets; a dead worker's queue is
# deleted with all of them.
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (3, 6, 9)


# kombu's bindings of Celery's remote-control (pidbox) exchange: one member per worker name.
KOMBU_PIDBOX_BINDINGS = "_kombu.binding.celery.pidbox"


def kombu_queue_keys(queue: str) -> list[str]:
    """Every Redis key kombu keeps for one queue."""
    return [queue, *(f"{queue}{KOMBU_PRIORITY_SEP}{p}" for p in KOMBU_PRIORITY_STEPS),
            f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]


# Worker claims (see workers.claims): a claim lives this long unless its autoscaler refreshes it,
# so the claims of a dead autoscaler free their slots within it.
CLAIM_TTL_S = 10
# Launcher and supervisor states outlive their writer by this much (they are rewritten every
# autoscaler pass / supervisor change).
LAUNCH_STATE_TTL_S = 10


def worker_claims(model: str) -> str:
    """Hash worker name -> expiry (ms) of the model's workers that autoscalers started or are
    starting, on every host: the shared count that keeps them all within the desired number."""
    return f"{PREFIX}:claims:{model}"


def launch_state(model: str) -> str:
    """Hash autoscaler id -> JSON of its launcher's state for the model (ok, backoff, failed;
    restarts, last exit), each with its own expiry."""
    return f"{PREFIX}:launch:{model}"


def autoscalers() -> str:
    """Hash autoscaler id -> JSON heartbeat (host, devices, pid, expiry) of live autoscalers."""
    return f"{PREFIX}:autoscalers"


def restarts() -> str:
    """Hash role -> restarts of the processes `asyncinfer up` supervises (gateway, batcher,
    autoscaler, flower, redis)."""
    return f"{PREFIX}:restarts"



# A webhook's delivery state lives this long after its last write (far past any retry schedule).
WEBHOOK_STATE_TTL_S = 86_400
# How long a delivered webhook stays marked done: longer than any second holder of its stream
# entry (one that reclaimed it from a stalled deliverer) could take to try it.
WEBHOOK_DONE_TTL_S = 600


def webhook_delivery(job_id: str) -> str:
    """Hash of one job's webhook delivery: attempts made and when the next one is due (ms), so a
    deliverer that reclaims the entry keeps the schedule instead of starting it over."""
    return f"{PREFIX}:whd:{job_id}"


def webhook_lock(job_id: str) -> str:
    """Held (with an expiry) while one POST of the job's webhook is in flight: one at a time."""
    return f"{PREFIX}:whl:{job_id}"
