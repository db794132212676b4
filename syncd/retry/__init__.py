"""Outbox, retry policy and the dispatcher that drains the outbox."""
