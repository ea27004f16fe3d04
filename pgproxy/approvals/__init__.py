"""Approval holds: the request store, reviewer notification, and the review pages."""
