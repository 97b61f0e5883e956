"""The work behind the example tasks; the tasks in jobs/tasks.py are thin adapters over these."""
