"""Keep skiplock_job and skiplock_job_attempt in step with procrastinate_jobs, in the same transaction.

Triggers see every change to the queue whoever makes it (the worker, procrastinate's functions,
the API, the admin, the stalled-job sweeper), so the job record can never disagree with the queue.
Each change of state, progress or step on skiplock_job is announced on the `skiplock_job` channel.
"""

from django.db import migrations

FORWARD = r"""
CREATE FUNCTION skiplock_jobs_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO skiplock_job (
        job_id, task_name, queue_name, priority, state, args, lock, queueing_lock,
        created_at, scheduled_at, attempts, progress, step, error_type, error_message,
        error_traceback, worker_name
    )
    SELECT id, task_name, queue_name, priority, status::text, args, lock, queueing_lock,
           now(), scheduled_at, 0, 0, '', '', '', '', ''
    FROM inserted_jobs
    ON CONFLICT (job_id) DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE TRIGGER skiplock_jobs_inserted
AFTER INSERT ON procrastinate_jobs
REFERENCING NEW TABLE AS inserted_jobs
FOR EACH STATEMENT EXECUTE FUNCTION skiplock_jobs_inserted();

CREATE FUNCTION skiplock_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    _state text := CASE WHEN NEW.status = 'doing' AND NEW.abort_requested THEN 'aborting'
                        ELSE NEW.status::text END;
    _worker text;
    _outcome text;
BEGIN
    IF OLD.status = 'todo' AND NEW.status = 'doing' THEN
        SELECT name INTO _worker FROM skiplock_worker WHERE worker_id = NEW.worker_id;
        _worker := COALESCE(_worker, 'worker-' || NEW.worker_id::text, '');
        INSERT INTO skiplock_job_attempt (
            job_id, number, worker_name, started_at, outcome, error_type, error_message, error_traceback
        )
        VALUES (
            NEW.id,
            (SELECT count(*) + 1 FROM skiplock_job_attempt WHERE job_id = NEW.id),
            _worker, now(), 'running', '', '', ''
        );
        UPDATE skiplock_job
        SET state = _state, worker_name = _worker, started_at = COALESCE(started_at, now()),
            finished_at = NULL, attempts = attempts + 1, scheduled_at = NEW.scheduled_at,
            priority = NEW.priority, queue_name = NEW.queue_name
        WHERE job_id = NEW.id;
        RETURN NULL;
    END IF;

    IF OLD.status = 'doing' AND NEW.status <> 'doing' THEN
        -- Who ended the attempt can say why (the stalled-job sweeper says 'lost').
        _outcome := COALESCE(
            NULLIF(current_setting('skiplock.attempt_outcome', true), ''),
            CASE NEW.status::text WHEN 'todo' THEN 'retried' ELSE NEW.status::text END
        );
        UPDATE skiplock_job_attempt SET finished_at = now(), outcome = _outcome
        WHERE job_id = NEW.id AND finished_at IS NULL;
    END IF;

    UPDATE skiplock_job
    SET state = _state,
        scheduled_at = NEW.scheduled_at,
        priority = NEW.priority,
        queue_name = NEW.queue_name,
        finished_at = CASE WHEN NEW.status IN ('succeeded', 'failed', 'cancelled', 'aborted')
                           THEN now() ELSE NULL END
    WHERE job_id = NEW.id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER skiplock_job_changed
AFTER UPDATE ON procrastinate_jobs
FOR EACH ROW
WHEN (OLD.status IS DISTINCT FROM NEW.status
      OR OLD.abort_requested IS DISTINCT FROM NEW.abort_requested
      OR OLD.scheduled_at IS DISTINCT FROM NEW.scheduled_at
      OR OLD.priority IS DISTINCT FROM NEW.priority
      OR OLD.queue_name IS DISTINCT FROM NEW.queue_name)
EXECUTE FUNCTION skiplock_job_changed();

CREATE FUNCTION skiplock_jobs_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM skiplock_job_attempt WHERE job_id IN (SELECT id FROM deleted_jobs);
    DELETE FROM skiplock_job WHERE job_id IN (SELECT id FROM deleted_jobs);
    RETURN NULL;
END;
$$;

CREATE TRIGGER skiplock_jobs_deleted
AFTER DELETE ON procrastinate_jobs
REFERENCING OLD TABLE AS deleted_jobs
FOR EACH STATEMENT EXECUTE FUNCTION skiplock_jobs_deleted();

CREATE FUNCTION skiplock_job_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('skiplock_job', json_build_object(
        'id', NEW.job_id,
        'event', CASE WHEN OLD.state IS DISTINCT FROM NEW.state THEN 'state' ELSE 'progress' END,
        'state', NEW.state,
        'progress', NEW.progress,
        'step', left(NEW.step, 200),
        'attempts', NEW.attempts
    )::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER skiplock_job_notify
AFTER UPDATE ON skiplock_job
FOR EACH ROW
WHEN (OLD.state IS DISTINCT FROM NEW.state
      OR OLD.progress IS DISTINCT FROM NEW.progress
      OR OLD.step IS DISTINCT FROM NEW.step)
EXECUTE FUNCTION skiplock_job_notify();
"""

BACKWARD = r"""
DROP TRIGGER IF EXISTS skiplock_job_notify ON skiplock_job;
DROP FUNCTION IF EXISTS skiplock_job_notify();
DROP TRIGGER IF EXISTS skiplock_jobs_deleted ON procrastinate_jobs;
DROP FUNCTION IF EXISTS skiplock_jobs_deleted();
DROP TRIGGER IF EXISTS skiplock_job_changed ON procrastinate_jobs;
DROP FUNCTION IF EXISTS skiplock_job_changed();
DROP TRIGGER IF EXISTS skiplock_jobs_inserted ON procrastinate_jobs;
DROP FUNCTION IF EXISTS skiplock_jobs_inserted();
"""


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0001_initial"),
        ("procrastinate", "0041_post_retry_failed_job"),
    ]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
