"""Bytes in, verified temp files out: one download attempt, the downloader
that retries it, and the helper processes that spread it over CPUs."""
