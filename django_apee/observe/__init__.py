"""Metrics, rate-limited logs and the statistics ``apee_stats`` formats."""
