"""Which ``Tree`` a mirror publishes into: the one place that turns
``[storage]`` into a tree, for the sync engine and ``mirror verify`` alike."""

from __future__ import annotations

from mirror import __version__
from mirror.layout import Layout
from mirror.metrics import Metrics
from mirror.publish.storecfg import StorageConfig
from mirror.publish.tree import FileTree, Tree


def open_tree(storage: StorageConfig, layout: Layout, *, metrics: Metrics | None = None) -> Tree:
    """The tree ``storage`` names (not prepared yet: call ``prepare``)."""
    if storage.backend == "s3" and storage.s3 is not None:
        from mirror.publish.s3tree import S3Tree

        return S3Tree(storage.s3, layout.tmp, journal=layout.uploads_journal, metrics=metrics, version=__version__)
    return FileTree.at(layout)

