"""Output delivery: the dispatcher drains the outbox written by finishes."""
