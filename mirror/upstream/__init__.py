"""What PyPI says: the client and its transport, the pure parsers, the feed
calls, and the retry policy every request follows."""
