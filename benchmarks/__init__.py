"""Load-test tools; not part of the installed package."""
