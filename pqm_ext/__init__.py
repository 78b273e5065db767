"""PQM toolkit."""
