"""One sync cycle (``cycle``), the feed it starts from (``feed``), and one
project's sync as an object (``project``)."""
