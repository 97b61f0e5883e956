"""The dashboard's time windows come from small rollup rows, not from the job table.

`skiplock_count_ends` (the one call every writer that ends jobs makes, in the statement that ends
them) now also counts the jobs that reached a final state

- per minute and state in `skiplock_minute_stats` (the last hour's chart and failure rate), and
- per hour, task, queue, state and, for succeeded jobs, log-scale duration bin in
  `skiplock_hour_stats` (the 24-hour chart, the per-queue figures and the duration percentiles).

Both tables are rings (slot = minute or hour number modulo the ring's size): a slot is reset when
a newer minute or hour reuses it, so they never grow past a few thousand rows and need no pruning.
What was in the last 25 hours when this migration runs is rolled up from the job table once.

It also makes two side-row indexes partial where the column is often NULL (see the operations).
"""

from django.db import migrations, models

# Keep in step with jobs.dashboard (MINUTE_SLOTS, HOUR_SLOTS, _BINS, _LO, _HI) and
# jobs.metrics.DURATION_BUCKETS (the /metrics histogram, unchanged since 0010).
MINUTE_SLOTS = 64  # > the 61 minutes the last-hour chart reads
HOUR_SLOTS = 32  # > the 25 hours the 24-hour chart reads
BINS, LO, HI = 120, 0.001, 86400.0
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

COUNTERS = r"""
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
""".replace(
    "ARRAY[BUCKETS]",
    "ARRAY[" + ", ".join(f"count(*) FILTER (WHERE e.seconds <= {b})" for b in DURATION_BUCKETS) + "]",
)

# A slot holds one minute (hour) at a time: the same one adds up, a newer one starts over, an older
# one (a transaction that began before the boundary and committed after a newer one) adds nothing.
ROLLUPS = rf"""
    INSERT INTO skiplock_minute_stats AS m (slot, state, shard, minute, count)
    SELECT (floor(extract(epoch FROM now()) / 60)::bigint % {MINUTE_SLOTS})::smallint, e.state,
           pg_backend_pid() % 4, date_trunc('minute', now()), count(*)
    FROM unnest(_final_states) AS e(state)
    WHERE e.state IS NOT NULL
    GROUP BY e.state
    ON CONFLICT (slot, state, shard) DO UPDATE
    SET count = CASE WHEN m.minute = EXCLUDED.minute THEN m.count + EXCLUDED.count
                     WHEN m.minute < EXCLUDED.minute THEN EXCLUDED.count ELSE m.count END,
        minute = greatest(m.minute, EXCLUDED.minute);
    INSERT INTO skiplock_hour_stats AS h (slot, task_name, queue_name, state, bin, shard, hour, count, max_seconds)
    SELECT (floor(extract(epoch FROM now()) / 3600)::bigint % {HOUR_SLOTS})::smallint, e.task, e.queue, e.state,
           CASE WHEN e.state = 'succeeded' AND e.seconds IS NOT NULL
                THEN width_bucket(ln(greatest(e.seconds, {LO})), ln({LO}), ln({HI}), {BINS}) ELSE -1 END AS bin,
           pg_backend_pid() % 4, date_trunc('hour', now()), count(*), max(e.seconds)
    FROM unnest(_tasks, _queues, _final_states, _seconds) AS e(task, queue, state, seconds)
    WHERE e.state IS NOT NULL AND e.task IS NOT NULL AND e.queue IS NOT NULL
    GROUP BY e.task, e.queue, e.state, bin
    ON CONFLICT (slot, task_name, queue_name, state, bin, shard) DO UPDATE
    SET count = CASE WHEN h.hour = EXCLUDED.hour THEN h.count + EXCLUDED.count
                     WHEN h.hour < EXCLUDED.hour THEN EXCLUDED.count ELSE h.count END,
        max_seconds = CASE WHEN h.hour = EXCLUDED.hour THEN greatest(h.max_seconds, EXCLUDED.max_seconds)
                           WHEN h.hour < EXCLUDED.hour THEN EXCLUDED.max_seconds ELSE h.max_seconds END,
        hour = greatest(h.hour, EXCLUDED.hour);
"""


def count_ends(body: str) -> str:
    return (
        "CREATE OR REPLACE FUNCTION skiplock_count_ends(\n"
        "    _tasks text[], _queues text[], _outcomes text[], _final_states text[], _seconds float8[]\n"
        ") RETURNS integer LANGUAGE sql AS $$" + body
        + "    SELECT coalesce(array_length(_outcomes, 1), 0);\n$$;\n"
    )


# The jobs that finished in the last 25 hours, as the function would have counted them (shard 0).
BACKFILL = rf"""
INSERT INTO skiplock_minute_stats (slot, state, shard, minute, count)
SELECT (floor(extract(epoch FROM m) / 60)::bigint % {MINUTE_SLOTS})::smallint, state, 0, m, count(*)
FROM (SELECT date_trunc('minute', r.finished_at) AS m, j.status::text AS state
      FROM skiplock_job r JOIN procrastinate_jobs j ON j.id = r.job_id
      WHERE r.finished_at >= date_trunc('minute', now()) - interval '{MINUTE_SLOTS - 1} minutes'
        AND j.status IN ('succeeded', 'failed', 'cancelled', 'aborted')) AS f
GROUP BY m, state;
INSERT INTO skiplock_hour_stats (slot, task_name, queue_name, state, bin, shard, hour, count, max_seconds)
SELECT (floor(extract(epoch FROM h) / 3600)::bigint % {HOUR_SLOTS})::smallint, task_name, queue_name, state, bin, 0, h,
       count(*), max(secs)
FROM (SELECT date_trunc('hour', r.finished_at) AS h, j.task_name, j.queue_name, j.status::text AS state,
             extract(epoch FROM r.finished_at - r.started_at)::float8 AS secs,
             CASE WHEN j.status = 'succeeded' AND r.started_at IS NOT NULL THEN
                  width_bucket(ln(greatest(extract(epoch FROM r.finished_at - r.started_at)::float8, {LO})),
                               ln({LO}), ln({HI}), {BINS}) ELSE -1 END AS bin
      FROM skiplock_job r JOIN procrastinate_jobs j ON j.id = r.job_id
      WHERE r.finished_at >= date_trunc('hour', now()) - interval '{HOUR_SLOTS - 1} hours'
        AND j.status IN ('succeeded', 'failed', 'cancelled', 'aborted')) AS f
GROUP BY h, task_name, queue_name, state, bin;
"""


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0011_lean_indexes"),
    ]

    operations = [
        migrations.CreateModel(
            name="HourStat",
            fields=[
                ("pk", models.CompositePrimaryKey("slot", "task_name", "queue_name", "state", "bin", "shard",
                                                  blank=True, editable=False, primary_key=True, serialize=False)),
                ("slot", models.SmallIntegerField()),
                ("task_name", models.CharField(max_length=128)),
                ("queue_name", models.CharField(max_length=128)),
                ("state", models.CharField(max_length=16)),
                ("bin", models.SmallIntegerField()),
                ("shard", models.SmallIntegerField()),
                ("hour", models.DateTimeField()),
                ("count", models.BigIntegerField()),
                ("max_seconds", models.FloatField(null=True)),
            ],
            options={"db_table": "skiplock_hour_stats"},
        ),
        migrations.CreateModel(
            name="MinuteStat",
            fields=[
                ("pk", models.CompositePrimaryKey("slot", "state", "shard", blank=True, editable=False,
                                                  primary_key=True, serialize=False)),
                ("slot", models.SmallIntegerField()),
                ("state", models.CharField(max_length=16)),
                ("shard", models.SmallIntegerField()),
                ("minute", models.DateTimeField()),
                ("count", models.BigIntegerField()),
            ],
            options={"db_table": "skiplock_minute_stats"},
        ),
        migrations.RunSQL(count_ends(COUNTERS + ROLLUPS) + BACKFILL, count_ends(COUNTERS)),
        # Partial where the column is often NULL: a job without an owner, or not finished yet,
        # writes no entry there (every filter on them names a value).
        migrations.RemoveIndex(model_name="jobside", name="skiplock_job_finished_idx"),
        migrations.RemoveIndex(model_name="jobside", name="skiplock_job_owner_idx"),
        migrations.AddIndex(
            model_name="jobside",
            index=models.Index(condition=models.Q(("finished_at__isnull", False)), fields=["finished_at"],
                               name="skiplock_job_finished_idx"),
        ),
        migrations.AddIndex(
            model_name="jobside",
            index=models.Index(condition=models.Q(("owner__isnull", False)), fields=["owner", "-job_id"],
                               name="skiplock_job_owner_idx"),
        ),
    ]
