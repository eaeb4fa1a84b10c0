"""Hostile programs against the real service; a package, so that its conftest has a name of its own."""
