"""Workloads: what peers do during a run. Each module exposes ``ROLE`` (the per-peer Role),
``summarize(run)`` (headline numbers for summary.json), optionally ``headline(run)`` (progress) and
``finished(run, alive)`` (True ends the run before its ``duration`` once no scheduled event is left;
``alive``: the live peers that run the workload)."""
