"""Workloads: what peers do during a run. Each module exposes ``ROLE`` (the per-peer Role),
``summarize(run)`` (headline numbers for summary.json) and optionally ``headline(run)`` (progress)."""
