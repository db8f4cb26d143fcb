"""Infrastructure: object storage, the embedded S3 server, the Ray runtime and worker gangs.

``cluster`` imports nothing from ``dataprep``, ``jobs`` or ``pipeline``.
"""
