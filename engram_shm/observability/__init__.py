"""Observability: the shared-memory stats block the engine's processes write
their counters into, the Prometheus collector that reads it at scrape time,
the metrics HTTP endpoint, and the one logging set-up of every process."""
