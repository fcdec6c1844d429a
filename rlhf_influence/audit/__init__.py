"""Reading a run's attribution back: which responses drove what the policy did."""

from .jumps import AuditReport, RoundSummary, audit_run, find_jumps

__all__ = ["AuditReport", "RoundSummary", "audit_run", "find_jumps"]
