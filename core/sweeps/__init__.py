"""Sweeps: one request that trains a job per point of a grid over spec fields and ranks them by a metric
(`grid.py` expands the grid, `service.py` creates, lists, cancels and releases, `views.py` shows them)."""
