"""Pure policy: classification, lineage, decisions, masking plans, diagnostic scrubbing."""
