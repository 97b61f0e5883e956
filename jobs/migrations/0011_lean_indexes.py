"""Fewer writes per job (issue 12): drop two indexes that others already cover, leave room for HOT updates.

- `skiplock_job.owner_id` and `skiplock_job_attempt.job_id` had single-column indexes (Django's
  default for a foreign key) beside composite ones that start with the same column
  (`skiplock_job_owner_idx`, `skiplock_attempt_job_number_uniq`): every insert paid for both.
- `skiplock_job` gets fillfactor 80, so a progress write (progress, step, progress_at: no index
  covers them) can be a heap-only update on the same page instead of a new version in every
  index of the table.
"""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("jobs", "0010_state_lives_once"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AlterField(
            model_name="jobattempt",
            name="job",
            field=models.ForeignKey(
                db_constraint=False, db_index=False, on_delete=django.db.models.deletion.DO_NOTHING,
                related_name="attempt_set", to="jobs.jobrecord",
            ),
        ),
        migrations.AlterField(
            model_name="jobside",
            name="owner",
            field=models.ForeignKey(
                blank=True, db_constraint=False, db_index=False, null=True,
                on_delete=django.db.models.deletion.SET_NULL, related_name="+", to=settings.AUTH_USER_MODEL,
            ),
        ),
        migrations.RunSQL(
            "ALTER TABLE skiplock_job SET (fillfactor = 80)",
            reverse_sql="ALTER TABLE skiplock_job RESET (fillfactor)",
        ),
    ]
