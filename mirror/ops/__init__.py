"""Running a mirror: the composition root, the daemon and its poll loop,
metrics export, sd_notify, the directory lock, status, progress and verify."""
