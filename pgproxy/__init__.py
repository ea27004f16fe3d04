"""pgproxy: a PostgreSQL wire-protocol governance proxy for AI agents that touch health data."""

__version__ = "0.1.0"
