"""Flow control (issue 15): paused queues, limits across every worker, unique starts, snooze,
discard and expiry.

- Two final states join procrastinate's status type: `discarded` (the task dropped itself with
  `raise Discard(reason)`) and `expired` (its `expires_at` passed before it ran; never run).
- `procrastinate_jobs` gets `skiplock_limit_key` (the task limit a job counts against, NULL for
  most jobs) and `skiplock_expires_at`; the claim statement skips both kinds of rows cheaply
  (limited jobs are claimed by `skiplock_claim_limited`); two partial indexes list the waiting
  jobs of one limit key, and of one queue, in claim order.
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
CREATE INDEX skiplock_jobs_limited_todo ON procrastinate_jobs (skiplock_limit_key, priority DESC, id)
    WHERE status = 'todo' AND skiplock_limit_key IS NOT NULL;
CREATE INDEX skiplock_jobs_todo_by_queue ON procrastinate_jobs (queue_name, priority DESC, id)
    WHERE status = 'todo';
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
# worker held before that claim). Limit first: the limits with due jobs waiting (queue limits of
# the worker's queues, then task limit keys) get their room (skiplock_limit_room: lock, then
# count); only limits with room are scanned, each on its own index in claim order (priority,
# id), so a full limit with a long backlog costs one room check, not a scan. A job in a limited
# queue that also has a key needs room in both. Rate-limited limits get their starts logged once
# at the end. Returns the claimed rows, then one row with a NULL id and `wake_in` (seconds until
# a rate limit admits another start) when a rate limit held jobs back.
# A waiting job a limited claim may take (alias `j`): due, not expired, the head of its `lock`
# (the rule of jobs.transitions.CLAIM, written out here because a migration is frozen).
RUNNABLE = """                  AND (j.scheduled_at IS NULL OR j.scheduled_at <= now())
                  AND (j.skiplock_expires_at IS NULL OR j.skiplock_expires_at > now())
                  AND (j.lock IS NULL OR NOT EXISTS (
                      SELECT 1 FROM procrastinate_jobs b
                      WHERE b.lock = j.lock AND b.id <> j.id
                        AND (b.status = 'doing'
                             OR (b.status = 'todo' AND (b.scheduled_at IS NULL OR b.scheduled_at <= now())
                                 AND (b.priority > j.priority OR (b.priority = j.priority AND b.id < j.id))))))"""

CLAIM_LIMITED = r"""
CREATE FUNCTION skiplock_claim_limited(_worker bigint, _queues varchar[], _n integer, _held integer)
RETURNS TABLE (id bigint, task_name varchar, queue_name varchar, priority integer, lock text,
               queueing_lock text, args jsonb, attempts integer, abort_requested boolean, wake_in float8)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    _paused varchar[];
    _limited varchar[];  -- limited, running queues among the worker's
    _buckets text[] := '{}';
    _rooms integer[] := '{}';
    _used integer[] := '{}';
    _bucket text;
    _name text;
    _i integer;
    _k integer;
    _left integer;
    _take integer;
    _wake float8;
    _room record;
    _row record;
    _job record;
    _claimed record;
    _ids bigint[] := '{}';
    _cur refcursor;
BEGIN
    SELECT COALESCE(array_agg(p.name) FILTER (WHERE p.paused), '{}'),
           COALESCE(array_agg(p.name) FILTER (WHERE NOT p.paused
                                                AND (p.concurrency IS NOT NULL OR p.rate_limit IS NOT NULL)
                                                AND (_queues IS NULL OR p.name = ANY(_queues))), '{}')
    INTO _paused, _limited
    FROM skiplock_queue p;
    IF cardinality(_limited) = 0 AND NOT EXISTS (
        SELECT 1 FROM procrastinate_jobs j
        WHERE j.status = 'todo' AND j.skiplock_limit_key IS NOT NULL
          AND (_queues IS NULL OR j.queue_name = ANY(_queues))
    ) THEN
        RETURN;  -- nothing waits under a limit here: the common case, one probe of an empty index
    END IF;
    -- Limits with due jobs waiting. One that looks full in this snapshot is skipped without its
    -- lock (a rate window only fills until its starts age out: its `wake` says when; a
    -- concurrency limit that frees a slot wakes the queue's workers, who claim again). Each one
    -- that looks open is locked and counted for real by skiplock_limit_room.
    FOR _row IN
        SELECT b.bucket, b.open, x.wake FROM (
            SELECT 'q:' || q.name AS bucket, q.rate_limit, q.rate_period, w.recent, w.oldest,
                   (q.rate_limit IS NULL OR q.rate_limit > w.recent) AND (q.concurrency IS NULL OR q.concurrency > (
                       SELECT count(*) FROM procrastinate_jobs d
                       WHERE d.status = 'doing' AND d.worker_id IS NOT NULL AND d.queue_name = q.name)) AS open
            FROM skiplock_queue q
            CROSS JOIN LATERAL (SELECT count(*) AS recent, min(s) AS oldest FROM unnest(q.starts) s
                                WHERE s > now() - make_interval(secs => COALESCE(q.rate_period, 0))) w
            WHERE q.name = ANY(_limited)
              AND EXISTS (SELECT 1 FROM procrastinate_jobs j
                          WHERE j.queue_name = q.name AND j.status = 'todo'
                            AND (j.scheduled_at IS NULL OR j.scheduled_at <= now()))
            UNION ALL
            SELECT 'k:' || l.key, l.rate_limit, l.rate_period, w.recent, w.oldest,
                   (l.rate_limit IS NULL OR l.rate_limit > w.recent) AND (l.concurrency IS NULL OR l.concurrency > (
                       SELECT count(*) FROM procrastinate_jobs d
                       WHERE d.status = 'doing' AND d.worker_id IS NOT NULL AND d.skiplock_limit_key = l.key))
            FROM skiplock_limit l
            CROSS JOIN LATERAL (SELECT count(*) AS recent, min(s) AS oldest FROM unnest(l.starts) s
                                WHERE s > now() - make_interval(secs => COALESCE(l.rate_period, 0))) w
            WHERE EXISTS (SELECT 1 FROM procrastinate_jobs j
                          WHERE j.skiplock_limit_key = l.key AND j.status = 'todo'
                            AND (j.scheduled_at IS NULL OR j.scheduled_at <= now())
                            AND (_queues IS NULL OR j.queue_name = ANY(_queues)) AND j.queue_name <> ALL(_paused))
        ) AS b(bucket, rate_limit, rate_period, recent, oldest, open)
        CROSS JOIN LATERAL (SELECT CASE WHEN b.rate_limit IS NOT NULL AND b.rate_limit <= b.recent
                                        THEN extract(epoch FROM b.oldest + make_interval(secs => b.rate_period) - now())
                                   END::float8 AS wake) x
    LOOP
        IF _row.wake IS NOT NULL THEN
            _wake := least(COALESCE(_wake, _row.wake), _row.wake);
        END IF;
        CONTINUE WHEN NOT _row.open;
        IF _left IS NULL THEN
            SELECT _n - (count(*)::integer - _held) INTO _left FROM procrastinate_jobs j
            WHERE j.worker_id = _worker AND j.status = 'doing';
            EXIT WHEN _left <= 0;
        END IF;
        SELECT * INTO _room FROM skiplock_limit_room(_row.bucket);
        _buckets := _buckets || _row.bucket;
        _rooms := _rooms || _room.room;
        _used := _used || 0;
        IF _room.wake_in IS NOT NULL THEN
            _wake := least(COALESCE(_wake, _room.wake_in), _room.wake_in);
        END IF;
    END LOOP;
    FOR _i IN 1 .. cardinality(_buckets) LOOP
        EXIT WHEN COALESCE(_left, 0) <= 0;
        CONTINUE WHEN _rooms[_i] <= 0;
        _name := substr(_buckets[_i], 3);
        _take := least(_rooms[_i], _left);
        IF left(_buckets[_i], 1) = 'q' THEN
            -- the queue's waiting jobs (a job with a key also needs room under its key)
            OPEN _cur FOR
                SELECT j.id, j.queue_name, j.skiplock_limit_key AS key FROM procrastinate_jobs j
                WHERE j.queue_name = _name AND j.status = 'todo'
{runnable}
                ORDER BY j.priority DESC, j.id
                LIMIT _take + 50
                FOR NO KEY UPDATE OF j SKIP LOCKED;
        ELSE
            -- the key's waiting jobs in unlimited queues (those in limited queues come with their queue)
            OPEN _cur FOR
                SELECT j.id, j.queue_name, j.skiplock_limit_key AS key FROM procrastinate_jobs j
                WHERE j.skiplock_limit_key = _name AND j.status = 'todo'
                  AND (_queues IS NULL OR j.queue_name = ANY(_queues))
                  AND j.queue_name <> ALL(_paused) AND j.queue_name <> ALL(_limited)
{runnable}
                ORDER BY j.priority DESC, j.id
                LIMIT _take
                FOR NO KEY UPDATE OF j SKIP LOCKED;
        END IF;
        LOOP
            EXIT WHEN _rooms[_i] <= 0 OR _left <= 0;
            FETCH _cur INTO _job;
            EXIT WHEN NOT FOUND;
            _k := NULL;
            IF left(_buckets[_i], 1) = 'q' AND _job.key IS NOT NULL THEN
                _k := array_position(_buckets, 'k:' || _job.key);
                CONTINUE WHEN _k IS NOT NULL AND _rooms[_k] <= 0;
            END IF;
            UPDATE procrastinate_jobs p SET status = 'doing', worker_id = _worker
            WHERE p.id = _job.id
            RETURNING p.id, p.task_name, p.queue_name, p.priority, p.lock, p.queueing_lock, p.args, p.attempts,
                      p.abort_requested INTO _claimed;
            _rooms[_i] := _rooms[_i] - 1;
            _used[_i] := _used[_i] + 1;
            IF _k IS NOT NULL THEN
                _rooms[_k] := _rooms[_k] - 1;
                _used[_k] := _used[_k] + 1;
            END IF;
            _left := _left - 1;
            _ids := _ids || _claimed.id;
            id := _claimed.id; task_name := _claimed.task_name; queue_name := _claimed.queue_name;
            priority := _claimed.priority; lock := _claimed.lock; queueing_lock := _claimed.queueing_lock;
            args := _claimed.args; attempts := _claimed.attempts; abort_requested := _claimed.abort_requested;
            wake_in := NULL;
            RETURN NEXT;
        END LOOP;
        CLOSE _cur;
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
""".replace("{runnable}", RUNNABLE)

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
