"""Several warmpod nodes on one PostgreSQL queue; a package, so that its conftest has a name of its own."""
