"""Iterative Influence-based Filtering over the engine: records, each algorithm's per-record loss and
spec, the filter's decision and the filter, IIF's settings and the KL controller. No TRL, no store."""
