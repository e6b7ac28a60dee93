"""Alembic migrations; `core.migrate` runs them with this package as the script location."""
