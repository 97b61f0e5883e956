"""Skiplock's own rows. procrastinate's tables are the queue; these are what people ask about.

A job's state lives once, in `procrastinate_jobs` (status, queue, priority, run time, attempts,
lock, worker). `JobSide` (table `skiplock_job`) holds only what procrastinate has no column for:
progress, step, result, error, owner, idempotency key and timings. `JobRecord` reads both through
the view `skiplock_job_view` (a primary-key join) under the old field names; it is read-only.
Nothing copies state between them: every write goes through `jobs.transitions`.
"""

from __future__ import annotations

import datetime as dt

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVector, SearchVectorField
from django.db import models
from django.db.models.functions import Now

from jobs.states import State, display_state


class JobSide(models.Model):
    """Skiplock's side row of a job: what the queue row cannot hold. Written by `jobs.transitions` only."""

    job_id = models.BigIntegerField(primary_key=True)  # procrastinate_jobs.id
    created_at = models.DateTimeField(db_default=Now())
    started_at = models.DateTimeField(null=True, blank=True)  # the first attempt's start
    finished_at = models.DateTimeField(null=True, blank=True)
    progress = models.SmallIntegerField(default=0, db_default=0)
    step = models.CharField(max_length=255, blank=True, default="", db_default="")
    progress_at = models.DateTimeField(null=True, blank=True)
    result = models.JSONField(null=True, blank=True)
    error_type = models.CharField(max_length=255, blank=True, default="", db_default="")
    error_message = models.TextField(blank=True, default="", db_default="")
    error_traceback = models.TextField(blank=True, default="", db_default="")
    worker_name = models.CharField(max_length=255, blank=True, default="", db_default="")
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    # Issue 13 item 4 (migration 0005): who started the job — "key:<id>", "user:<id>", or "" for
    # code and commands. An idempotency key is unique per starter, never across principals.
    started_by = models.CharField(max_length=32, blank=True, default="", db_default="")
    owner = models.ForeignKey(  # indexed by skiplock_job_owner_idx (owner, -job_id)
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
        db_constraint=False, related_name="+", db_index=False,
    )
    # Issue 14 (migration 0013): a label the running task gave itself (Celery's custom states), the
    # attempt that set it (attempts as claimed: the label belongs to that run), and free-form meta.
    custom_state = models.CharField(max_length=64, blank=True, default="", db_default="")
    custom_state_attempt = models.IntegerField(null=True, blank=True)
    meta = models.JSONField(null=True, blank=True)
    # A start that asked to be unique (flow control): the digest of task + chosen arguments or key.
    unique_key = models.CharField(max_length=64, null=True, blank=True)

    class Meta:
        db_table = "skiplock_job"
        verbose_name = "job side row"
        # Partial where the column is often NULL (migration 0012): a job without an owner, or not
        # finished yet, writes no entry there (every filter on them names a value).
        indexes = [
            models.Index(fields=["created_at"], name="skiplock_job_created_idx"),
            models.Index(fields=["finished_at"], name="skiplock_job_finished_idx",
                         condition=models.Q(finished_at__isnull=False)),
            models.Index(fields=["owner", "-job_id"], name="skiplock_job_owner_idx",
                         condition=models.Q(owner__isnull=False)),
        ]
        constraints = [
            models.UniqueConstraint(  # per starter (issue 13 item 4), was global
                fields=["started_by", "idempotency_key"], name="skiplock_job_idempotency_per_starter_uniq",
                condition=models.Q(idempotency_key__isnull=False),
            ),
            models.CheckConstraint(
                condition=models.Q(progress__gte=0, progress__lte=100), name="skiplock_job_progress_range"
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.job_id}"


class JobRecord(models.Model):
    """One job as people see it: the queue row joined with its side row (view `skiplock_job_view`).

    Read-only. `state` is procrastinate's status, with *aborting* for a running job whose abort
    was requested; filter on `status`/`abort_requested` (index-backed, see selectors.state_filter).
    `attempts` counts the attempts started so far, the running one included.
    """

    job_id = models.BigIntegerField(primary_key=True)
    task_name = models.CharField(max_length=128)
    queue_name = models.CharField(max_length=128)
    priority = models.IntegerField(default=0)
    status = models.CharField(max_length=16)  # procrastinate's status, as stored
    abort_requested = models.BooleanField(default=False)
    state = models.CharField(max_length=16, choices=[(s.value, s.value) for s in State])
    args = models.JSONField(default=dict)
    lock = models.TextField(null=True, blank=True)
    queueing_lock = models.TextField(null=True, blank=True)
    worker_id = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(null=True, blank=True)
    scheduled_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    attempts = models.IntegerField(default=0)
    progress = models.SmallIntegerField(default=0)
    step = models.CharField(max_length=255, blank=True, default="")
    progress_at = models.DateTimeField(null=True, blank=True)
    result = models.JSONField(null=True, blank=True)
    error_type = models.CharField(max_length=255, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    error_traceback = models.TextField(blank=True, default="")
    worker_name = models.CharField(max_length=255, blank=True, default="")
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    started_by = models.CharField(max_length=32, blank=True, default="")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.DO_NOTHING,
        db_constraint=False, related_name="+",
    )
    custom_state = models.CharField(max_length=64, blank=True, default="")  # only while its attempt runs
    meta = models.JSONField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)  # past it the job is never run (ends expired)
    limit_key = models.TextField(null=True, blank=True)  # the task limit it waits on, if any

    class Meta:
        managed = False
        db_table = "skiplock_job_view"
        verbose_name = "job"
        ordering = ["-job_id"]

    def __str__(self) -> str:
        return f"#{self.job_id} {self.task_name}"

    @property
    def display_state(self) -> str:
        return display_state(self.state, scheduled_at=self.scheduled_at, attempts=self.attempts,
                             expires_at=self.expires_at)

    @property
    def duration(self) -> dt.timedelta | None:
        if self.started_at is None:
            return None
        end = self.finished_at or dt.datetime.now(dt.UTC)
        return end - self.started_at

    @property
    def error(self) -> dict[str, str] | None:
        if not self.error_type:
            return None
        return {"type": self.error_type, "message": self.error_message, "traceback": self.error_traceback}


class JobAttempt(models.Model):
    """One ended run of a job: who ran it, when, and how it ended. Written by whoever ends it.

    A running attempt has no row: it is the queue row itself (status doing, worker_id, and
    procrastinate's latest `started` event), shown by `selectors.job_attempts`.
    """

    class Outcome(models.TextChoices):
        RUNNING = "running"  # only on the derived row of the attempt in progress
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        RETRIED = "retried"  # failed, and the retry policy scheduled another attempt
        ABORTED = "aborted"
        LOST = "lost"  # the worker died; stall recovery took the job back
        TIMED_OUT = "timed_out"
        REQUEUED = "requeued"  # the worker shut down; the job waits again, no retry used
        SNOOZED = "snoozed"  # the task asked to run later (Snooze); no attempt used
        DISCARDED = "discarded"  # the task dropped the job (Discard)
        EXPIRED = "expired"  # its expiry passed before it started; not run

    # indexed by skiplock_attempt_job_number_uniq (job, number)
    job = models.ForeignKey(JobRecord, on_delete=models.DO_NOTHING, db_constraint=False, related_name="attempt_set",
                            db_index=False)
    number = models.IntegerField()
    worker_name = models.CharField(max_length=255, blank=True, default="", db_default="")
    started_at = models.DateTimeField(db_default=Now())
    finished_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices, default=Outcome.RUNNING, db_default="running")
    error_type = models.CharField(max_length=255, blank=True, default="", db_default="")
    error_message = models.TextField(blank=True, default="", db_default="")
    error_traceback = models.TextField(blank=True, default="", db_default="")

    class Meta:
        db_table = "skiplock_job_attempt"
        ordering = ["job_id", "number"]
        constraints = [models.UniqueConstraint(fields=["job", "number"], name="skiplock_attempt_job_number_uniq")]

    def __str__(self) -> str:
        return f"#{self.job_id} attempt {self.number}: {self.outcome}"


class TaskStat(models.Model):
    """Ended attempts per task and outcome: counters that never go down (pruning keeps them).

    Incremented set-based by whoever ends an attempt, through the SQL function
    `skiplock_count_ends`; `shard` spreads concurrent finishers over a few rows.
    """

    task_name = models.CharField(max_length=128)
    outcome = models.CharField(max_length=16)
    shard = models.SmallIntegerField(default=0)
    count = models.BigIntegerField(default=0)
    seconds_sum = models.FloatField(default=0.0)
    buckets = ArrayField(models.BigIntegerField(), default=list)  # cumulative, per metrics.DURATION_BUCKETS

    class Meta:
        db_table = "skiplock_task_stats"
        constraints = [
            models.UniqueConstraint(fields=["task_name", "outcome", "shard"], name="skiplock_task_stats_uniq")
        ]

    def __str__(self) -> str:
        return f"{self.task_name} {self.outcome}: {self.count}"


class QueueStat(models.Model):
    """Jobs that reached a final state, per queue: a counter that never goes down."""

    queue_name = models.CharField(max_length=128)
    state = models.CharField(max_length=16)
    shard = models.SmallIntegerField(default=0)
    count = models.BigIntegerField(default=0)

    class Meta:
        db_table = "skiplock_queue_stats"
        constraints = [
            models.UniqueConstraint(fields=["queue_name", "state", "shard"], name="skiplock_queue_stats_uniq")
        ]

    def __str__(self) -> str:
        return f"{self.queue_name} {self.state}: {self.count}"


class MinuteStat(models.Model):
    """Jobs that reached a final state per minute, for the dashboard's last hour (a ring of
    MINUTE_SLOTS minutes: a slot is reset when a newer minute reuses it, so nothing needs pruning).

    Written by `skiplock_count_ends` in the statement that ends the jobs (migration 0012)."""

    pk = models.CompositePrimaryKey("slot", "state", "shard")
    slot = models.SmallIntegerField()
    state = models.CharField(max_length=16)
    shard = models.SmallIntegerField()
    minute = models.DateTimeField()
    count = models.BigIntegerField()

    class Meta:
        db_table = "skiplock_minute_stats"

    def __str__(self) -> str:
        return f"{self.minute:%H:%M} {self.state}: {self.count}"


class HourStat(models.Model):
    """Jobs that reached a final state per hour, task, queue and (succeeded ones) duration bin, for the
    dashboard's last 24 hours (a ring of HOUR_SLOTS hours, reset on reuse like MinuteStat)."""

    pk = models.CompositePrimaryKey("slot", "task_name", "queue_name", "state", "bin", "shard")
    slot = models.SmallIntegerField()
    task_name = models.CharField(max_length=128)
    queue_name = models.CharField(max_length=128)
    state = models.CharField(max_length=16)
    bin = models.SmallIntegerField()  # log-scale duration bin of a succeeded job; -1 for the others
    shard = models.SmallIntegerField()
    hour = models.DateTimeField()
    count = models.BigIntegerField()
    max_seconds = models.FloatField(null=True)

    class Meta:
        db_table = "skiplock_hour_stats"

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H:00} {self.task_name} {self.state}: {self.count}"


class Listener(models.Model):
    """A process listening on the `skiplock_job` channel; `skiplock_announce` notifies only while one is."""

    name = models.CharField(max_length=255, primary_key=True)
    expires_at = models.DateTimeField()

    class Meta:
        managed = False  # created by migration 0010; runtime state, left alone by test flushes
        db_table = "skiplock_listener"

    def __str__(self) -> str:
        return self.name


class WorkerInfo(models.Model):
    """What procrastinate's worker table lacks: a name, host, pid, queues and concurrency."""

    worker_id = models.BigIntegerField(primary_key=True)  # procrastinate_workers.id
    name = models.CharField(max_length=255)
    hostname = models.CharField(max_length=255, blank=True, default="")
    pid = models.IntegerField(null=True, blank=True)
    queues = models.JSONField(default=list, blank=True)  # empty: all queues
    concurrency = models.IntegerField(default=1)
    processes = models.IntegerField(default=1)
    started_at = models.DateTimeField(db_default=Now())
    last_seen_at = models.DateTimeField(db_default=Now())
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "skiplock_worker"
        verbose_name = "worker"
        indexes = [models.Index(fields=["-last_seen_at"], name="skiplock_worker_seen_idx")]

    def __str__(self) -> str:
        return self.name


class QueueControl(models.Model):
    """How a queue is steered at run time (flow control): paused, and its limits across all workers.

    A row exists once a queue was paused or limited; no row means running, unlimited. `starts` is
    the log of recent starts of a rate-limited queue (written under the queue's claim lock).
    """

    name = models.CharField(max_length=128, primary_key=True)
    paused = models.BooleanField(default=False, db_default=False)
    paused_at = models.DateTimeField(null=True, blank=True)
    changed_by = models.CharField(max_length=255, blank=True, default="", db_default="")
    concurrency = models.IntegerField(null=True, blank=True)  # at most this many running at once
    rate_limit = models.IntegerField(null=True, blank=True)  # at most this many starts ...
    rate_period = models.FloatField(null=True, blank=True)  # ... in any window of this many seconds
    starts = ArrayField(models.DateTimeField(), default=list, blank=True, db_default=[])
    updated_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "skiplock_queue"
        verbose_name = "queue"
        constraints = [
            models.CheckConstraint(condition=models.Q(concurrency__isnull=True) | models.Q(concurrency__gte=1),
                                   name="skiplock_queue_concurrency_positive"),
            models.CheckConstraint(
                condition=(models.Q(rate_limit__isnull=True, rate_period__isnull=True)
                           | models.Q(rate_limit__gte=1, rate_period__gt=0)),
                name="skiplock_queue_rate_complete"),
        ]

    def __str__(self) -> str:
        return self.name


class TaskLimit(models.Model):
    """A task's limit for one key (`@task(concurrency=ConcurrencyLimit(5, key="partner:{partner_id}"))`).

    Written when a job of the task is started (the code declares the numbers); `key` is what the
    task's jobs carry in `procrastinate_jobs.skiplock_limit_key`. `starts` as on QueueControl.
    """

    key = models.TextField(primary_key=True)
    task_name = models.CharField(max_length=128)
    concurrency = models.IntegerField(null=True, blank=True)
    rate_limit = models.IntegerField(null=True, blank=True)
    rate_period = models.FloatField(null=True, blank=True)
    starts = ArrayField(models.DateTimeField(), default=list, blank=True, db_default=[])
    updated_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "skiplock_limit"
        verbose_name = "task limit"

    def __str__(self) -> str:
        return self.key


class PeriodicSwitch(models.Model):
    """A periodic schedule switched off (or back on) at run time; no row means enabled."""

    key = models.CharField(max_length=255, primary_key=True)  # task name, or "task:periodic_id"
    enabled = models.BooleanField(default=True)
    changed_at = models.DateTimeField(db_default=Now())
    changed_by = models.CharField(max_length=255, blank=True, default="", db_default="")

    class Meta:
        db_table = "skiplock_periodic_switch"
        verbose_name = "periodic switch"

    def __str__(self) -> str:
        return f"{self.key}: {'on' if self.enabled else 'off'}"


class ApiKey(models.Model):
    """A bearer key for the REST API; only its SHA-256 is stored."""

    class Scope(models.TextChoices):
        START = "start"
        READ = "read"
        MANAGE = "manage"

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True)
    key_hash = models.CharField(max_length=64, unique=True)
    scopes = models.JSONField(default=list)
    created_at = models.DateTimeField(db_default=Now())
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        db_table = "skiplock_api_key"
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


class Document(models.Model):
    """A document of the index_document example pipeline."""

    class Status(models.TextChoices):
        PROCESSING = "processing"
        INDEXED = "indexed"
        FAILED = "failed"

    title = models.CharField(max_length=255)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PROCESSING)
    source_path = models.CharField(max_length=1024, blank=True, default="")
    char_count = models.IntegerField(default=0)
    chunk_count = models.IntegerField(default=0)
    error = models.TextField(blank=True, default="")
    job_id = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "skiplock_document"

    def __str__(self) -> str:
        return self.title


class DocumentChunk(models.Model):
    """A chunk of a document with its embedding and a full-text index."""

    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    position = models.IntegerField()
    text = models.TextField()
    embedding = models.JSONField()
    search_vector = models.GeneratedField(
        expression=SearchVector("text", config="english"),
        output_field=SearchVectorField(),
        db_persist=True,
    )

    class Meta:
        db_table = "skiplock_document_chunk"
        ordering = ["document_id", "position"]
        indexes = [GinIndex(fields=["search_vector"], name="skiplock_chunk_search_idx")]
        constraints = [
            models.UniqueConstraint(fields=["document", "position"], name="skiplock_chunk_position_uniq")
        ]

    def __str__(self) -> str:
        return f"{self.document_id}#{self.position}"
