"""The HTTP gateway: submit, poll, long-poll, cancel, models, health and metrics."""
