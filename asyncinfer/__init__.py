"""asyncinfer: asynchronous batched inference over Redis Streams and Celery.

User-facing pieces live here: the `asyncinfer` command line and the local stack it starts.
"""

__version__ = "0.1.0"
