"""The audit trail: typed records, the DuckDB writer, tamper evidence, analyst access."""
