"""Flow control (issue 15): paused queues, limits across every worker, unique starts, snooze,
discard and expiry.

- Two final states join procrastinate's status type: `discarded` (the task dropped itself with
  `raise Discard(reason)`) and `expired` (its `expires_at` passed before it ran; never run).
- `procrastinate_jobs` gets `skiplock_limit_key` (the task limit a job counts against, NULL for
  most jobs) and `skiplock_expires_at`; the claim statement skips both kinds of rows cheaply
  (limited jobs are claimed by `skiplock_claim_limited`), and a partial index lists the limited
  waiting jobs in claim order.
- `skiplock_queue` (pause, queue limits, rate log), `skiplock_limit` (task limits per key) and
  `skiplock_periodic_switch` (periodic schedules switched off at run time).
- `skiplock_job.unique_key`: the digest a unique start is looked up by.
- `skiplock_claim_limited(worker, queues, n, held)`: claims jobs under limits, one at a time in
  claim order, each limit checked under its own transaction-level advisory lock with a fresh
  snapshot, so no limit is exceeded whatever the number of claimers (see jobs/transitions.py).
- `skiplock_job_view` shows `expires_at` and `limit_key`.
"""

import importlib

import django.contrib.postgres.fields
import django.db.models.functions.datetime
from django.db import migrations, models

_0013_VIEW: str = importlib.import_module("jobs.migrations.0013_custom_state_and_meta").VIEW
assert "       r.meta\n" in _0013_VIEW

VIEW = _0013_VIEW.replace(
    "       r.meta\n",
    "       r.meta,\n"
    "       j.skiplock_expires_at AS expires_at,\n"
    "       j.skiplock_limit_key AS limit_key\n",
)

ENUM = """
ALTER TYPE procrastinate_job_status ADD VALUE IF NOT EXISTS 'discarded';
ALTER TYPE procrastinate_job_status ADD VALUE IF NOT EXISTS 'expired';
"""

COLUMNS = f"""
ALTER TABLE procrastinate_jobs ADD COLUMN skiplock_limit_key text, ADD COLUMN skiplock_expires_at timestamptz;
CREATE INDEX skiplock_jobs_limited_todo ON procrastinate_jobs (priority DESC, id)
    WHERE status = 'todo' AND skiplock_limit_key IS NOT NULL;
CREATE INDEX skiplock_jobs_expiring_todo ON procrastinate_jobs (skiplock_expires_at)
    WHERE status = 'todo' AND skiplock_expires_at IS NOT NULL;
ALTER TABLE skiplock_job ADD COLUMN unique_key varchar(64);
CREATE INDEX skiplock_job_unique_idx ON skiplock_job (unique_key, job_id DESC) WHERE unique_key IS NOT NULL;
DROP VIEW IF EXISTS skiplock_job_view;
{VIEW};
"""

COLUMNS_BACK = f"""
DROP VIEW IF EXISTS skiplock_job_view;
{_0013_VIEW};
ALTER TABLE skiplock_job DROP COLUMN unique_key;
ALTER TABLE procrastinate_jobs DROP COLUMN skiplock_limit_key, DROP COLUMN skiplock_expires_at;
"""

# The room one limit has left for this claim: 0 when another claimer holds its lock (skip it this
# time), else the smaller of concurrency − running and rate − starts in the window. The lock is
# taken first; the counts are read by the statements after it, whose snapshot sees every claim
# committed before the lock was granted. A key without a row (no limit declared) has no bound.
ROOM = r"""
CREATE FUNCTION skiplock_limit_room(_bucket text, OUT room integer, OUT wake_in float8)
LANGUAGE plpgsql AS $$
DECLARE
    _kind text := left(_bucket, 1);
    _name text := substr(_bucket, 3);
    _concurrency integer;
    _rate integer;
    _period float8;
    _starts timestamptz[];
    _running integer;
    _recent integer;
BEGIN
    wake_in := NULL;
    IF NOT pg_try_advisory_xact_lock(hashtext('skiplock.limit'), hashtext(_bucket)) THEN
        room := 0;
        RETURN;
    END IF;
    IF _kind = 'q' THEN
        SELECT q.concurrency, q.rate_limit, q.rate_period, q.starts INTO _concurrency, _rate, _period, _starts
        FROM skiplock_queue q WHERE q.name = _name;
    ELSE
        SELECT l.concurrency, l.rate_limit, l.rate_period, l.starts INTO _concurrency, _rate, _period, _starts
        FROM skiplock_limit l WHERE l.key = _name;
    END IF;
    room := 2147483647;
    IF _concurrency IS NOT NULL THEN
        IF _kind = 'q' THEN
            SELECT count(*) INTO _running FROM procrastinate_jobs j
            WHERE j.status = 'doing' AND j.worker_id IS NOT NULL AND j.queue_name = _name;
        ELSE
            SELECT count(*) INTO _running FROM procrastinate_jobs j
            WHERE j.status = 'doing' AND j.worker_id IS NOT NULL AND j.skiplock_limit_key = _name;
        END IF;
        room := least(room, _concurrency - _running);
    END IF;
    IF _rate IS NOT NULL THEN
        SELECT count(*) INTO _recent FROM unnest(_starts) s WHERE s > now() - make_interval(secs => _period);
        room := least(room, _rate - _recent);
        IF _rate - _recent <= 0 THEN
            -- when the oldest start in the window leaves it
            SELECT extract(epoch FROM min(s) + make_interval(secs => _period) - now()) INTO wake_in
            FROM unnest(_starts) s WHERE s > now() - make_interval(secs => _period);
        END IF;
    END IF;
END $$;
"""

# Claim up to `_n` jobs that wait under a limit (a limited queue, or a task limit key) for
# `_worker`, minus what the claim before it in the same transaction took (`_held`: the jobs the
# worker held before that claim). One candidate at a time in claim order (priority, id), skipping
# jobs whose limits have no room; at most 1000 candidates looked at per call. Rate-limited
# buckets get their starts logged once at the end. Returns the claimed rows, and one row with a
# NULL id and `wake_in` (seconds until a rate limit frees a start) when a rate limit held jobs back.
CLAIM_LIMITED = r"""
CREATE FUNCTION skiplock_claim_limited(_worker bigint, _queues varchar[], _n integer, _held integer)
RETURNS TABLE (id bigint, task_name varchar, queue_name varchar, priority integer, lock text,
               queueing_lock text, args jsonb, attempts integer, abort_requested boolean, wake_in float8)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    _limited varchar[];
    _job record;
    _claimed record;
    _buckets text[] := '{}';
    _rooms integer[] := '{}';
    _used integer[] := '{}';
    _bucket text;
    _i integer;
    _ok boolean;
    _left integer;
    _scanned integer := 0;
    _wake float8;
    _room record;
    _ids bigint[] := '{}';
BEGIN
    SELECT COALESCE(array_agg(q.name), '{}') INTO _limited FROM skiplock_queue q
    WHERE NOT q.paused AND (q.concurrency IS NOT NULL OR q.rate_limit IS NOT NULL)
      AND (_queues IS NULL OR q.name = ANY(_queues));
    IF cardinality(_limited) = 0 AND NOT EXISTS (
        SELECT 1 FROM procrastinate_jobs j
        WHERE j.status = 'todo' AND j.skiplock_limit_key IS NOT NULL
          AND (_queues IS NULL OR j.queue_name = ANY(_queues))
    ) THEN
        RETURN;
    END IF;
    SELECT _n - (count(*)::integer - _held) INTO _left FROM procrastinate_jobs j
    WHERE j.worker_id = _worker AND j.status = 'doing';
    IF _left <= 0 THEN
        RETURN;
    END IF;
    FOR _job IN
        SELECT j.id, j.queue_name, j.skiplock_limit_key
        FROM procrastinate_jobs j
        WHERE j.status = 'todo'
          AND (j.skiplock_limit_key IS NOT NULL OR j.queue_name = ANY(_limited))
          AND (_queues IS NULL OR j.queue_name = ANY(_queues))
          AND j.queue_name NOT IN (SELECT p.name FROM skiplock_queue p WHERE p.paused)
          AND (j.scheduled_at IS NULL OR j.scheduled_at <= now())
          AND (j.skiplock_expires_at IS NULL OR j.skiplock_expires_at > now())
          AND (j.lock IS NULL OR NOT EXISTS (
              SELECT 1 FROM procrastinate_jobs b
              WHERE b.lock = j.lock AND b.id <> j.id
                AND (b.status = 'doing'
                     OR (b.status = 'todo'
                         AND (b.scheduled_at IS NULL OR b.scheduled_at <= now())
                         AND (b.priority > j.priority OR (b.priority = j.priority AND b.id < j.id))))
          ))
        ORDER BY j.priority DESC, j.id
        FOR NO KEY UPDATE OF j SKIP LOCKED
    LOOP
        _scanned := _scanned + 1;
        EXIT WHEN _scanned > 1000;
        _ok := true;
        FOREACH _bucket IN ARRAY ARRAY[
            CASE WHEN _job.queue_name = ANY(_limited) THEN 'q:' || _job.queue_name END,
            'k:' || _job.skiplock_limit_key
        ] LOOP
            CONTINUE WHEN _bucket IS NULL;
            _i := array_position(_buckets, _bucket);
            IF _i IS NULL THEN
                SELECT * INTO _room FROM skiplock_limit_room(_bucket);
                _buckets := _buckets || _bucket;
                _rooms := _rooms || _room.room;
                _used := _used || 0;
                _i := cardinality(_buckets);
                IF _room.wake_in IS NOT NULL THEN
                    _wake := least(COALESCE(_wake, _room.wake_in), _room.wake_in);
                END IF;
            END IF;
            IF _rooms[_i] <= 0 THEN
                _ok := false;
            END IF;
        END LOOP;
        CONTINUE WHEN NOT _ok;
        UPDATE procrastinate_jobs p SET status = 'doing', worker_id = _worker
        WHERE p.id = _job.id
        RETURNING p.id, p.task_name, p.queue_name, p.priority, p.lock, p.queueing_lock, p.args, p.attempts,
                  p.abort_requested INTO _claimed;
        FOREACH _bucket IN ARRAY ARRAY[
            CASE WHEN _job.queue_name = ANY(_limited) THEN 'q:' || _job.queue_name END,
            'k:' || _job.skiplock_limit_key
        ] LOOP
            CONTINUE WHEN _bucket IS NULL;
            _i := array_position(_buckets, _bucket);
            _rooms[_i] := _rooms[_i] - 1;
            _used[_i] := _used[_i] + 1;
        END LOOP;
        _ids := _ids || _claimed.id;
        id := _claimed.id; task_name := _claimed.task_name; queue_name := _claimed.queue_name;
        priority := _claimed.priority; lock := _claimed.lock; queueing_lock := _claimed.queueing_lock;
        args := _claimed.args; attempts := _claimed.attempts; abort_requested := _claimed.abort_requested;
        wake_in := NULL;
        RETURN NEXT;
        _left := _left - 1;
        EXIT WHEN _left <= 0;
    END LOOP;
    FOR _i IN 1 .. cardinality(_buckets) LOOP
        CONTINUE WHEN _used[_i] = 0;
        IF left(_buckets[_i], 1) = 'q' THEN
            UPDATE skiplock_queue q
            SET starts = ARRAY(SELECT s FROM unnest(q.starts) s WHERE s > now() - make_interval(secs => 2 * q.rate_period))
                         || array_fill(now(), ARRAY[_used[_i]])
            WHERE q.name = substr(_buckets[_i], 3) AND q.rate_limit IS NOT NULL;
        ELSE
            UPDATE skiplock_limit l
            SET starts = ARRAY(SELECT s FROM unnest(l.starts) s WHERE s > now() - make_interval(secs => 2 * l.rate_period))
                         || array_fill(now(), ARRAY[_used[_i]])
            WHERE l.key = substr(_buckets[_i], 3) AND l.rate_limit IS NOT NULL;
        END IF;
    END LOOP;
    IF cardinality(_ids) > 0 AND EXISTS (SELECT 1 FROM skiplock_listener WHERE expires_at > now()) THEN
        PERFORM skiplock_announce((
            SELECT jsonb_agg(jsonb_build_object(
                'id', x.id, 'event', 'state', 'state', CASE WHEN x.abort_requested THEN 'aborting' ELSE 'doing' END,
                'progress', COALESCE(r.progress, 0), 'step', left(COALESCE(r.step, ''), 200),
                'attempts', x.attempts + 1))
            FROM procrastinate_jobs x LEFT JOIN skiplock_job r ON r.job_id = x.id
            WHERE x.id = ANY(_ids)
        ));
    END IF;
    IF _wake IS NOT NULL THEN
        id := NULL; task_name := NULL; queue_name := NULL; priority := NULL; lock := NULL;
        queueing_lock := NULL; args := NULL; attempts := NULL; abort_requested := NULL;
        wake_in := greatest(_wake, 0.001);
        RETURN NEXT;
    END IF;
END $$;
"""

FUNCTIONS_BACK = """
DROP FUNCTION IF EXISTS skiplock_claim_limited(bigint, varchar[], integer, integer);
DROP FUNCTION IF EXISTS skiplock_limit_room(text);
"""


class Migration(migrations.Migration):
    # ALTER TYPE ... ADD VALUE: the new values can be used only once that statement committed.
    atomic = False

    dependencies = [("jobs", "0013_custom_state_and_meta")]

    operations = [
        migrations.RunSQL(ENUM, migrations.RunSQL.noop),
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunSQL(COLUMNS, COLUMNS_BACK)],
            state_operations=[
                migrations.AddField(model_name="jobside", name="unique_key",
                                    field=models.CharField(blank=True, max_length=64, null=True)),
                migrations.AddField(model_name="jobrecord", name="expires_at",
                                    field=models.DateTimeField(blank=True, null=True)),
                migrations.AddField(model_name="jobrecord", name="limit_key",
                                    field=models.TextField(blank=True, null=True)),
            ],
        ),
        migrations.CreateModel(
            name="QueueControl",
            fields=[
                ("name", models.CharField(max_length=128, primary_key=True, serialize=False)),
                ("paused", models.BooleanField(db_default=False, default=False)),
                ("paused_at", models.DateTimeField(blank=True, null=True)),
                ("changed_by", models.CharField(blank=True, db_default="", default="", max_length=255)),
                ("concurrency", models.IntegerField(blank=True, null=True)),
                ("rate_limit", models.IntegerField(blank=True, null=True)),
                ("rate_period", models.FloatField(blank=True, null=True)),
                ("starts", django.contrib.postgres.fields.ArrayField(
                    base_field=models.DateTimeField(), blank=True, db_default=[], default=list, size=None)),
                ("updated_at", models.DateTimeField(db_default=django.db.models.functions.datetime.Now())),
            ],
            options={
                "verbose_name": "queue",
                "db_table": "skiplock_queue",
                "constraints": [
                    models.CheckConstraint(
                        condition=models.Q(("concurrency__isnull", True), ("concurrency__gte", 1), _connector="OR"),
                        name="skiplock_queue_concurrency_positive"),
                    models.CheckConstraint(
                        condition=models.Q(models.Q(("rate_limit__isnull", True), ("rate_period__isnull", True)),
                                           models.Q(("rate_limit__gte", 1), ("rate_period__gt", 0)),
                                           _connector="OR"),
                        name="skiplock_queue_rate_complete"),
                ],
            },
        ),
        migrations.CreateModel(
            name="TaskLimit",
            fields=[
                ("key", models.TextField(primary_key=True, serialize=False)),
                ("task_name", models.CharField(max_length=128)),
                ("concurrency", models.IntegerField(blank=True, null=True)),
                ("rate_limit", models.IntegerField(blank=True, null=True)),
                ("rate_period", models.FloatField(blank=True, null=True)),
                ("starts", django.contrib.postgres.fields.ArrayField(
                    base_field=models.DateTimeField(), blank=True, db_default=[], default=list, size=None)),
                ("updated_at", models.DateTimeField(db_default=django.db.models.functions.datetime.Now())),
            ],
            options={"verbose_name": "task limit", "db_table": "skiplock_limit"},
        ),
        migrations.CreateModel(
            name="PeriodicSwitch",
            fields=[
                ("key", models.CharField(max_length=255, primary_key=True, serialize=False)),
                ("enabled", models.BooleanField(default=True)),
                ("changed_at", models.DateTimeField(db_default=django.db.models.functions.datetime.Now())),
                ("changed_by", models.CharField(blank=True, db_default="", default="", max_length=255)),
            ],
            options={"verbose_name": "periodic switch", "db_table": "skiplock_periodic_switch"},
        ),
        migrations.RunSQL(ROOM + CLAIM_LIMITED, FUNCTIONS_BACK),
    ]
