"""A job going back to `todo` never collides with its queueing lock (procrastinate#1543).

A retry (by the worker's policy, a manual retry, a requeue of a lost or interrupted attempt)
puts a job back to `todo`. If another job holding the same queueing lock is already waiting,
procrastinate's unique index refuses the update: the retry raises, and the job stays `doing`
for ever (the worker retries the write in a loop). A queueing lock dedupes *starts*; so here
the retried job keeps its retry and gives up the key (as Oban's uniqueness, checked on insert).
"""

from django.db import migrations

FORWARD = r"""
CREATE FUNCTION skiplock_queueing_lock_on_retry() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM procrastinate_jobs
        WHERE queueing_lock = NEW.queueing_lock AND status = 'todo' AND id <> NEW.id
    ) THEN
        NEW.queueing_lock := NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER skiplock_queueing_lock_on_retry
BEFORE UPDATE OF status ON procrastinate_jobs
FOR EACH ROW
WHEN (NEW.status = 'todo' AND OLD.status <> 'todo' AND NEW.queueing_lock IS NOT NULL)
EXECUTE FUNCTION skiplock_queueing_lock_on_retry();
"""

BACKWARD = r"""
DROP TRIGGER IF EXISTS skiplock_queueing_lock_on_retry ON procrastinate_jobs;
DROP FUNCTION IF EXISTS skiplock_queueing_lock_on_retry();
"""


class Migration(migrations.Migration):
    # 0003 exists in the tree: depend on it so the graph stays linear (the integrator may renumber).
    dependencies = [("jobs", "0003_unlink_finished_jobs_from_workers")]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
