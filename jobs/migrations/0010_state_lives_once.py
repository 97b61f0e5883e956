"""A job's state lives once: in procrastinate_jobs. No trigger copies it, none rewrites the queue row.

- Drops the triggers of 0002 (record copy, attempt rows, deletes, NOTIFY), 0003 (unlink the
  worker: the writers in jobs.transitions clear `worker_id` themselves) and 0004 (queueing lock on
  retry: done set-based by the retrying statement).
- `skiplock_job` keeps only what procrastinate has no column for (model `JobSide`); the state-copy
  columns and the indexes only they needed go. `skiplock_job_view` joins both by primary key under
  the old names (model `JobRecord`, read-only).
- Indexes on procrastinate_jobs for the admin/API filters, newest first: (status, id DESC) over
  finished jobs only, (task_name, id DESC) and (queue_name, id DESC).
- `skiplock_announce(jsonb)`: one NOTIFY on `skiplock_job` per call (split under 8000 bytes),
  only while a listener is registered in `skiplock_listener`.
- `skiplock_count_ends(...)`: set-based counters of ended attempts per task and outcome, and of jobs
  that reached a final state per queue, for /metrics (never lowered by pruning).
"""

import django.contrib.postgres.fields
import django.db.models.deletion
import django.db.models.functions.datetime
from django.conf import settings
from django.db import migrations, models

# Keep in step with jobs.metrics.DURATION_BUCKETS (cumulative histogram bounds, seconds).
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

STATE_COPY_COLUMNS = (
    "task_name", "queue_name", "priority", "state", "args", "lock", "queueing_lock", "scheduled_at", "attempts",
)

VIEW = r"""
CREATE VIEW skiplock_job_view AS
SELECT j.id AS job_id,
       j.task_name,
       j.queue_name,
       j.priority,
       j.status,
       j.abort_requested,
       CASE WHEN j.status = 'doing' AND j.abort_requested THEN 'aborting' ELSE j.status::text END AS state,
       j.args,
       j.lock,
       j.queueing_lock,
       j.worker_id,
       r.created_at,
       j.scheduled_at,
       COALESCE(r.started_at, CASE WHEN j.status = 'doing' THEN (
           SELECT max(e.at) FROM procrastinate_events e WHERE e.job_id = j.id AND e.type = 'started'
       ) END) AS started_at,
       r.finished_at,  -- NULL unless the job is final (its writers see to it): the index serves filters
       j.attempts + CASE WHEN j.status = 'doing' THEN 1 ELSE 0 END AS attempts,
       COALESCE(r.progress, 0)::smallint AS progress,
       COALESCE(r.step, '') AS step,
       r.progress_at,
       r.result,
       COALESCE(r.error_type, '') AS error_type,
       COALESCE(r.error_message, '') AS error_message,
       COALESCE(r.error_traceback, '') AS error_traceback,
       CASE WHEN j.status = 'doing' AND j.worker_id IS NOT NULL THEN COALESCE(
           (SELECT w.name FROM skiplock_worker w WHERE w.worker_id = j.worker_id), 'worker-' || j.worker_id::text
       ) ELSE COALESCE(r.worker_name, '') END AS worker_name,
       r.idempotency_key,
       COALESCE(r.started_by, '') AS started_by,
       r.owner_id
FROM procrastinate_jobs j
LEFT JOIN skiplock_job r ON r.job_id = j.id
"""

FUNCTIONS = r"""
CREATE FUNCTION skiplock_announce(_events jsonb) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    _chunk text := '';
    _item text;
    _sent integer := 0;
BEGIN
    IF _events IS NULL OR jsonb_typeof(_events) <> 'array' OR jsonb_array_length(_events) = 0 THEN
        RETURN 0;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM skiplock_listener WHERE expires_at > now()) THEN
        RETURN 0;  -- nobody listens: no NOTIFY, so no commit waits on the notification queue lock
    END IF;
    IF octet_length(_events::text) < 7900 THEN
        PERFORM pg_notify('skiplock_job', _events::text);
        RETURN 1;
    END IF;
    FOR _item IN SELECT value::text FROM jsonb_array_elements(_events) LOOP
        IF _chunk <> '' AND octet_length(_chunk) + octet_length(_item) + 2 > 7900 THEN
            PERFORM pg_notify('skiplock_job', '[' || _chunk || ']');
            _sent := _sent + 1;
            _chunk := '';
        END IF;
        _chunk := CASE WHEN _chunk = '' THEN _item ELSE _chunk || ',' || _item END;
    END LOOP;
    IF _chunk <> '' THEN
        PERFORM pg_notify('skiplock_job', '[' || _chunk || ']');
        _sent := _sent + 1;
    END IF;
    RETURN _sent;
END;
$$;

CREATE FUNCTION skiplock_count_ends(
    _tasks text[], _queues text[], _outcomes text[], _final_states text[], _seconds float8[]
) RETURNS integer LANGUAGE sql AS $$
    INSERT INTO skiplock_task_stats AS s (task_name, outcome, shard, count, seconds_sum, buckets)
    SELECT e.task, e.outcome, pg_backend_pid() % 4, count(*), COALESCE(sum(e.seconds), 0),
           ARRAY[BUCKETS]::bigint[]
    FROM unnest(_tasks, _outcomes, _seconds) AS e(task, outcome, seconds)
    WHERE e.outcome IS NOT NULL AND e.task IS NOT NULL
    GROUP BY e.task, e.outcome
    ON CONFLICT (task_name, outcome, shard) DO UPDATE
    SET count = s.count + EXCLUDED.count,
        seconds_sum = s.seconds_sum + EXCLUDED.seconds_sum,
        buckets = ARRAY(SELECT a + b FROM unnest(s.buckets, EXCLUDED.buckets) AS x(a, b));
    INSERT INTO skiplock_queue_stats AS q (queue_name, state, shard, count)
    SELECT e.queue, e.state, pg_backend_pid() % 4, count(*)
    FROM unnest(_queues, _final_states) AS e(queue, state)
    WHERE e.state IS NOT NULL AND e.queue IS NOT NULL
    GROUP BY e.queue, e.state
    ON CONFLICT (queue_name, state, shard) DO UPDATE SET count = q.count + EXCLUDED.count;
    SELECT coalesce(array_length(_outcomes, 1), 0);
$$;
""".replace(
    "ARRAY[BUCKETS]",
    "ARRAY[" + ", ".join(f"count(*) FILTER (WHERE e.seconds <= {b})" for b in DURATION_BUCKETS) + "]",
)

FORWARD = (
    r"""
DROP TRIGGER IF EXISTS skiplock_job_notify ON skiplock_job;
DROP FUNCTION IF EXISTS skiplock_job_notify();
DROP TRIGGER IF EXISTS skiplock_jobs_deleted ON procrastinate_jobs;
DROP FUNCTION IF EXISTS skiplock_jobs_deleted();
DROP TRIGGER IF EXISTS skiplock_job_changed ON procrastinate_jobs;
DROP FUNCTION IF EXISTS skiplock_job_changed();
DROP TRIGGER IF EXISTS skiplock_jobs_inserted ON procrastinate_jobs;
DROP FUNCTION IF EXISTS skiplock_jobs_inserted();
DROP TRIGGER IF EXISTS skiplock_queueing_lock_on_retry ON procrastinate_jobs;
DROP FUNCTION IF EXISTS skiplock_queueing_lock_on_retry();
DROP TRIGGER IF EXISTS skiplock_unlink_worker ON procrastinate_jobs;
DROP FUNCTION IF EXISTS skiplock_unlink_worker();

-- Attempts still open were rows the triggers kept; a running attempt is now the queue row itself.
DELETE FROM skiplock_job_attempt WHERE finished_at IS NULL;
-- Side rows whose first start was only on the copy: keep it (the view reads it from here).
ALTER TABLE skiplock_job
"""
    + ",\n".join(f"    DROP COLUMN {name}" for name in STATE_COPY_COLUMNS)
    + ";\n"
    + VIEW
    + ";\n"
    + r"""
-- Filters newest first, without a sort whatever the filter's selectivity. Waiting and running jobs
-- are served by procrastinate's partial indexes (status todo/doing); finished states get a partial
-- index, so a claim (todo → doing) adds no entry to it.
CREATE INDEX skiplock_pj_final_id_idx ON procrastinate_jobs (status, id DESC)
    WHERE status IN ('succeeded', 'failed', 'cancelled', 'aborted');
CREATE INDEX skiplock_pj_task_id_idx ON procrastinate_jobs (task_name, id DESC);
CREATE INDEX skiplock_pj_queue_id_idx ON procrastinate_jobs (queue_name, id DESC);
"""
    + FUNCTIONS
)

BACKWARD = r"""
DROP FUNCTION IF EXISTS skiplock_count_ends(text[], text[], text[], text[], float8[]);
DROP FUNCTION IF EXISTS skiplock_announce(jsonb);
DROP INDEX IF EXISTS skiplock_pj_final_id_idx;
DROP INDEX IF EXISTS skiplock_pj_task_id_idx;
DROP INDEX IF EXISTS skiplock_pj_queue_id_idx;
DROP VIEW IF EXISTS skiplock_job_view;
ALTER TABLE skiplock_job
    ADD COLUMN task_name varchar(128) NOT NULL DEFAULT '',
    ADD COLUMN queue_name varchar(128) NOT NULL DEFAULT '',
    ADD COLUMN priority integer NOT NULL DEFAULT 0,
    ADD COLUMN state varchar(16) NOT NULL DEFAULT 'todo',
    ADD COLUMN args jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN lock text,
    ADD COLUMN queueing_lock text,
    ADD COLUMN scheduled_at timestamptz,
    ADD COLUMN attempts integer NOT NULL DEFAULT 0;
UPDATE skiplock_job r
SET task_name = j.task_name, queue_name = j.queue_name, priority = j.priority,
    state = CASE WHEN j.status = 'doing' AND j.abort_requested THEN 'aborting' ELSE j.status::text END,
    args = j.args, lock = j.lock, queueing_lock = j.queueing_lock, scheduled_at = j.scheduled_at,
    attempts = j.attempts
FROM procrastinate_jobs j WHERE j.id = r.job_id;
CREATE INDEX skiplock_job_state_idx ON skiplock_job (state, job_id DESC);
CREATE INDEX skiplock_job_task_idx ON skiplock_job (task_name, job_id DESC);
CREATE INDEX skiplock_job_queue_idx ON skiplock_job (queue_name, job_id DESC);
-- The triggers of 0002-0004 come back by re-running those migrations' SQL (migrate jobs 0004 after
-- migrate jobs 0003 if you need them).
"""

JOB_SIDE_FIELDS = [
    ("job_id", models.BigIntegerField(primary_key=True, serialize=False)),
    ("created_at", models.DateTimeField(db_default=django.db.models.functions.datetime.Now())),
    ("started_at", models.DateTimeField(blank=True, null=True)),
    ("finished_at", models.DateTimeField(blank=True, null=True)),
    ("progress", models.SmallIntegerField(db_default=0, default=0)),
    ("step", models.CharField(blank=True, db_default="", default="", max_length=255)),
    ("progress_at", models.DateTimeField(blank=True, null=True)),
    ("result", models.JSONField(blank=True, null=True)),
    ("error_type", models.CharField(blank=True, db_default="", default="", max_length=255)),
    ("error_message", models.TextField(blank=True, db_default="", default="")),
    ("error_traceback", models.TextField(blank=True, db_default="", default="")),
    ("worker_name", models.CharField(blank=True, db_default="", default="", max_length=255)),
    ("idempotency_key", models.CharField(blank=True, max_length=255, null=True)),
    ("started_by", models.CharField(blank=True, db_default="", default="", max_length=32)),
    ("owner", models.ForeignKey(
        blank=True, db_constraint=False, null=True, on_delete=django.db.models.deletion.SET_NULL,
        related_name="+", to=settings.AUTH_USER_MODEL,
    )),
]

STATE_ONLY = [
    # JobRecord becomes the read model over the view; its table's indexes now belong to JobSide.
    migrations.RemoveIndex(model_name="jobrecord", name="skiplock_job_state_idx"),
    migrations.RemoveIndex(model_name="jobrecord", name="skiplock_job_task_idx"),
    migrations.RemoveIndex(model_name="jobrecord", name="skiplock_job_queue_idx"),
    migrations.RemoveIndex(model_name="jobrecord", name="skiplock_job_created_idx"),
    migrations.RemoveIndex(model_name="jobrecord", name="skiplock_job_finished_idx"),
    migrations.RemoveIndex(model_name="jobrecord", name="skiplock_job_owner_idx"),
    migrations.RemoveConstraint(model_name="jobrecord", name="skiplock_job_idempotency_per_starter_uniq"),
    migrations.RemoveConstraint(model_name="jobrecord", name="skiplock_job_progress_range"),
    migrations.AlterModelOptions(
        name="jobrecord", options={"managed": False, "ordering": ["-job_id"], "verbose_name": "job"},
    ),
    migrations.AlterModelTable(name="jobrecord", table="skiplock_job_view"),
    migrations.AddField(model_name="jobrecord", name="status", field=models.CharField(default="todo", max_length=16),
                        preserve_default=False),
    migrations.AddField(model_name="jobrecord", name="abort_requested", field=models.BooleanField(default=False)),
    migrations.AddField(model_name="jobrecord", name="worker_id", field=models.BigIntegerField(blank=True, null=True)),
    migrations.AlterField(model_name="jobrecord", name="created_at", field=models.DateTimeField(blank=True, null=True)),
    migrations.AlterField(model_name="jobrecord", name="attempts", field=models.IntegerField(default=0)),
    migrations.AlterField(model_name="jobrecord", name="progress", field=models.SmallIntegerField(default=0)),
    migrations.AlterField(model_name="jobrecord", name="step",
                          field=models.CharField(blank=True, default="", max_length=255)),
    migrations.AlterField(model_name="jobrecord", name="error_type",
                          field=models.CharField(blank=True, default="", max_length=255)),
    migrations.AlterField(model_name="jobrecord", name="error_message", field=models.TextField(blank=True, default="")),
    migrations.AlterField(model_name="jobrecord", name="error_traceback", field=models.TextField(blank=True, default="")),
    migrations.AlterField(model_name="jobrecord", name="started_by",
                          field=models.CharField(blank=True, default="", max_length=32)),
    migrations.AlterField(model_name="jobrecord", name="worker_name",
                          field=models.CharField(blank=True, default="", max_length=255)),
    migrations.AlterField(
        model_name="jobrecord", name="owner",
        field=models.ForeignKey(blank=True, db_constraint=False, null=True,
                                on_delete=django.db.models.deletion.DO_NOTHING, related_name="+",
                                to=settings.AUTH_USER_MODEL),
    ),
    migrations.AlterField(
        model_name="jobattempt", name="job",
        field=models.ForeignKey(db_constraint=False, on_delete=django.db.models.deletion.DO_NOTHING,
                                related_name="attempt_set", to="jobs.jobrecord"),
    ),
    migrations.CreateModel(
        name="JobSide",
        fields=JOB_SIDE_FIELDS,
        options={
            "verbose_name": "job side row",
            "db_table": "skiplock_job",
            "indexes": [
                models.Index(fields=["created_at"], name="skiplock_job_created_idx"),
                models.Index(fields=["finished_at"], name="skiplock_job_finished_idx"),
                models.Index(fields=["owner", "-job_id"], name="skiplock_job_owner_idx"),
            ],
            "constraints": [
                models.UniqueConstraint(condition=models.Q(("idempotency_key__isnull", False)),
                                        fields=("started_by", "idempotency_key"),
                                        name="skiplock_job_idempotency_per_starter_uniq"),
                models.CheckConstraint(condition=models.Q(("progress__gte", 0), ("progress__lte", 100)),
                                       name="skiplock_job_progress_range"),
            ],
        },
    ),
]


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0005_idempotency_per_principal"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        # Unmanaged: registrations are runtime state (a test flush must not drop a live hub's row).
        migrations.RunSQL(
            "CREATE TABLE skiplock_listener (name varchar(255) PRIMARY KEY, expires_at timestamptz NOT NULL)",
            "DROP TABLE skiplock_listener",
        ),
        migrations.CreateModel(
            name="Listener",
            fields=[
                ("name", models.CharField(max_length=255, primary_key=True, serialize=False)),
                ("expires_at", models.DateTimeField()),
            ],
            options={"db_table": "skiplock_listener", "managed": False},
        ),
        migrations.CreateModel(
            name="QueueStat",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("queue_name", models.CharField(max_length=128)),
                ("state", models.CharField(max_length=16)),
                ("shard", models.SmallIntegerField(default=0)),
                ("count", models.BigIntegerField(default=0)),
            ],
            options={
                "db_table": "skiplock_queue_stats",
                "constraints": [models.UniqueConstraint(fields=("queue_name", "state", "shard"),
                                                        name="skiplock_queue_stats_uniq")],
            },
        ),
        migrations.CreateModel(
            name="TaskStat",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("task_name", models.CharField(max_length=128)),
                ("outcome", models.CharField(max_length=16)),
                ("shard", models.SmallIntegerField(default=0)),
                ("count", models.BigIntegerField(default=0)),
                ("seconds_sum", models.FloatField(default=0.0)),
                ("buckets", django.contrib.postgres.fields.ArrayField(base_field=models.BigIntegerField(), default=list)),
            ],
            options={
                "db_table": "skiplock_task_stats",
                "constraints": [models.UniqueConstraint(fields=("task_name", "outcome", "shard"),
                                                        name="skiplock_task_stats_uniq")],
            },
        ),
        migrations.AlterField(
            model_name="jobattempt", name="outcome",
            field=models.CharField(
                choices=[("running", "Running"), ("succeeded", "Succeeded"), ("failed", "Failed"),
                         ("retried", "Retried"), ("aborted", "Aborted"), ("lost", "Lost"),
                         ("timed_out", "Timed Out"), ("requeued", "Requeued")],
                db_default="running", default="running", max_length=16,
            ),
        ),
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunSQL(FORWARD, BACKWARD)],
            state_operations=STATE_ONLY,
        ),
    ]
