"""Skiplock's own rows. procrastinate's tables are the queue; these are what people ask about.

`JobRecord` and `JobAttempt` are kept in step with `procrastinate_jobs` by database triggers
(migration 0002): every insert, state change and delete of a queue row updates its record in the
same transaction, whoever made it. The worker adds what only it knows (result, error, progress).
"""

from __future__ import annotations

import datetime as dt

from django.conf import settings
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVector, SearchVectorField
from django.db import models
from django.db.models.functions import Now

from jobs.states import State, display_state


class JobRecord(models.Model):
    """One row per procrastinate job: state, progress, result, last error, timings."""

    job_id = models.BigIntegerField(primary_key=True)
    task_name = models.CharField(max_length=128)
    queue_name = models.CharField(max_length=128)
    priority = models.IntegerField(default=0)
    state = models.CharField(max_length=16, choices=[(s.value, s.value) for s in State])
    args = models.JSONField(default=dict)
    lock = models.TextField(null=True, blank=True)
    queueing_lock = models.TextField(null=True, blank=True)
    created_at = models.DateTimeField(db_default=Now())
    scheduled_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    attempts = models.IntegerField(default=0, db_default=0)
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
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
        db_constraint=False, related_name="+",
    )

    class Meta:
        db_table = "skiplock_job"
        verbose_name = "job"
        ordering = ["-job_id"]
        indexes = [
            models.Index(fields=["state", "-job_id"], name="skiplock_job_state_idx"),
            models.Index(fields=["task_name", "-job_id"], name="skiplock_job_task_idx"),
            models.Index(fields=["queue_name", "-job_id"], name="skiplock_job_queue_idx"),
            models.Index(fields=["created_at"], name="skiplock_job_created_idx"),
            models.Index(fields=["finished_at"], name="skiplock_job_finished_idx"),
            models.Index(fields=["owner", "-job_id"], name="skiplock_job_owner_idx"),
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
        return f"#{self.job_id} {self.task_name}"

    @property
    def display_state(self) -> str:
        return display_state(self.state, scheduled_at=self.scheduled_at, attempts=self.attempts)

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
    """One run of a job: who ran it, when, and how it ended."""

    class Outcome(models.TextChoices):
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        RETRIED = "retried"  # failed, and the retry policy scheduled another attempt
        ABORTED = "aborted"
        LOST = "lost"  # the worker died; the stalled-job sweeper took the job back
        TIMED_OUT = "timed_out"

    job = models.ForeignKey(JobRecord, on_delete=models.CASCADE, db_constraint=False, related_name="attempt_set")
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
