"""Unlink jobs from their worker once they leave `doing` (procrastinate issue #1454).

procrastinate keeps `worker_id` on every finished job; deleting a worker row (a worker stopping,
or pruning dead workers when one starts) then runs `ON DELETE SET NULL` over every job that
worker ever ran — minutes on a table of millions of rows. A BEFORE UPDATE trigger clears
`worker_id` in the same row write that ends the attempt (no extra write), so a worker row only
ever references the jobs it is running. Who ran a job stays on skiplock_job / skiplock_job_attempt.
"""

from django.db import migrations

FORWARD = r"""
CREATE FUNCTION skiplock_unlink_worker() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.worker_id := NULL;
    RETURN NEW;
END;
$$;

CREATE TRIGGER skiplock_unlink_worker
BEFORE UPDATE OF status ON procrastinate_jobs
FOR EACH ROW
WHEN (NEW.status <> 'doing' AND NEW.worker_id IS NOT NULL)
EXECUTE FUNCTION skiplock_unlink_worker();

UPDATE procrastinate_jobs SET worker_id = NULL WHERE status <> 'doing' AND worker_id IS NOT NULL;
"""

BACKWARD = r"""
DROP TRIGGER IF EXISTS skiplock_unlink_worker ON procrastinate_jobs;
DROP FUNCTION IF EXISTS skiplock_unlink_worker();
"""


class Migration(migrations.Migration):
    dependencies = [("jobs", "0002_job_record_triggers")]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
