"""Tests of the approval hold: store, service, mail outbox, review pages."""
