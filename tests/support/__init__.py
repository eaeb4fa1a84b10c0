"""What the suites share: fakes for the unit tests, live servers, a PostgreSQL, hostile programs."""
