"""Idempotency keys are scoped per principal (issue 13 item 4), not global.

Another principal reusing someone's key used to get the owner's job id, task and state back in a
409, and could pre-claim keys. Each job now records who started it (`started_by`: "key:<id>",
"user:<id>", or "" for code and commands) and a key is unique per starter.

Jobs started before this migration: those of a signed-in user are attributed to that user; those
of an API key cannot be told apart from code's and stay "" (their keys no longer match a key's
new starts, so a retry of such a start after the upgrade starts a new job).
"""

from django.db import migrations, models

BACKFILL = "UPDATE skiplock_job SET started_by = 'user:' || owner_id WHERE owner_id IS NOT NULL"


class Migration(migrations.Migration):
    dependencies = [("jobs", "0004_queueing_lock_on_retry")]

    operations = [
        migrations.RemoveConstraint(
            model_name="jobrecord",
            name="skiplock_job_idempotency_key_uniq",
        ),
        migrations.AddField(
            model_name="jobrecord",
            name="started_by",
            field=models.CharField(blank=True, db_default="", default="", max_length=32),
        ),
        migrations.RunSQL(BACKFILL, migrations.RunSQL.noop),
        migrations.AddConstraint(
            model_name="jobrecord",
            constraint=models.UniqueConstraint(
                condition=models.Q(("idempotency_key__isnull", False)),
                fields=("started_by", "idempotency_key"),
                name="skiplock_job_idempotency_per_starter_uniq",
            ),
        ),
    ]
