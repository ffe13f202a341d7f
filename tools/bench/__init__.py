"""``make bench`` (issue 7): worker throughput against a bare consumer, HTTP ingest rate and
latency, snapshot delay and memory, written to ``docs/benchmarks.md`` from the run's own
output.  ``python -m tools.bench`` (``__main__.py``) is the command; each module here measures one thing."""
