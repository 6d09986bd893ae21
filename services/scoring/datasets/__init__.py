"""Real data sets replayed as contract events (for evaluation; nothing here runs in a service)."""
