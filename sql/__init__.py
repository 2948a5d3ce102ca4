"""The schema migrations, applied in order by marketflow.store.postgres.

This folder ships inside the installed package as `marketflow.sql` (see pyproject.toml), so a
plain `pip install .` can migrate from any working directory.
"""
