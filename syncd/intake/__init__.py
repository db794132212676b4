"""Intake: webhooks in, durable events out. Answers only once the event is on disk."""
