"""The asyncio server: listener, per-connection handler, upstream connections."""
