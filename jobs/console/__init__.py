"""The job console: Skiplock's Django admin (job list and detail, actions, dashboard, workers,
periodic tasks, API keys). `jobs/admin.py` registers it on the default admin site."""
