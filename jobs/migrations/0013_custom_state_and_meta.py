"""Custom states and free-form meta (issue 14): what a task says about itself while it runs.

`skiplock_job` gets `custom_state` (a label such as Celery's `update_state(state="BUILDING")`),
`custom_state_attempt` (the attempt that set it: a label belongs to one run) and `meta` (free-form
JSON). They are written by one fenced statement (jobs/transitions.py, "custom states and meta").
`skiplock_job_view` shows `custom_state` only while the attempt that set it runs — a label on a
running job, never a queue state — and `meta` as last written.
"""

import importlib

from django.db import migrations, models

_0010_VIEW: str = importlib.import_module("jobs.migrations.0010_state_lives_once").VIEW
assert "       r.owner_id\n" in _0010_VIEW

VIEW = _0010_VIEW.replace(
    "       r.owner_id\n",
    "       r.owner_id,\n"
    "       CASE WHEN j.status = 'doing' AND r.custom_state_attempt = j.attempts\n"
    "            THEN COALESCE(r.custom_state, '') ELSE '' END AS custom_state,\n"
    "       r.meta\n",
)

FORWARD = f"""
ALTER TABLE skiplock_job
    ADD COLUMN custom_state varchar(64) NOT NULL DEFAULT '',
    ADD COLUMN custom_state_attempt integer,
    ADD COLUMN meta jsonb;
DROP VIEW IF EXISTS skiplock_job_view;
{VIEW};
"""

BACKWARD = f"""
DROP VIEW IF EXISTS skiplock_job_view;
{_0010_VIEW};
ALTER TABLE skiplock_job DROP COLUMN custom_state, DROP COLUMN custom_state_attempt, DROP COLUMN meta;
"""


class Migration(migrations.Migration):
    dependencies = [("jobs", "0012_dashboard_rollups")]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunSQL(FORWARD, BACKWARD)],
            state_operations=[
                migrations.AddField(model_name="jobside", name="custom_state", field=models.CharField(
                    blank=True, db_default="", default="", max_length=64)),
                migrations.AddField(model_name="jobside", name="custom_state_attempt",
                                    field=models.IntegerField(blank=True, null=True)),
                migrations.AddField(model_name="jobside", name="meta",
                                    field=models.JSONField(blank=True, null=True)),
                migrations.AddField(model_name="jobrecord", name="custom_state", field=models.CharField(
                    blank=True, default="", max_length=64)),
                migrations.AddField(model_name="jobrecord", name="meta",
                                    field=models.JSONField(blank=True, null=True)),
            ],
        ),
    ]
