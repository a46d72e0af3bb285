"""edgefleet agent: runs on each board (verify, patch, stage, hot-load, serve, report)."""

__version__ = "0.1.0"
