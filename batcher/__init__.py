"""The batcher: reads model streams, asks the batching policy when to release, dispatches batches
to Celery, and reclaims the work of dead batchers and workers."""
