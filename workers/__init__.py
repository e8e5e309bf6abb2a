"""Worker processes: the Celery batch task, the model runtime, device pinning, autoscaling."""
