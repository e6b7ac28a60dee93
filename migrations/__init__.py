"""Alembic migrations; `migrations.runner` runs them with this package as the script location."""
