"""What secondaries rely on: the end of a cycle on the primary (retirement,
change lists, trace) and ``mirror pull``, which copies a primary with rsync."""
