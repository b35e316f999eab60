"""Pure decisions: what changed, what to fetch, what to publish, which files
the filters keep, and the safety valve.  No trio, httpx, sqlite3 or os."""
