"""The one writer: every change to a job goes through a conditional statement in this module.

Defer, cancel, abort, retry, run-now, delete, stall recovery and pruning (first part), and the
worker's hot path — claim, finish in batches, release, progress (second part). Each statement is
conditional and returns what changed; every write made for an attempt is fenced on
(job, worker, attempt). See docs/architecture.md for the data path and the state diagram.
"""

from __future__ import annotations

# --- jobs: defer and the transitions people ask for ------------------------------------------------


# --- worker hot path: claim, finish, release, progress ---------------------------------------------
