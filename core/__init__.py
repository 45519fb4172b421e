"""Shared core of kbench: the LM wrapper, model loading, training plumbing, records and value types."""
