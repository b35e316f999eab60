"""The root index, written in one streaming pass from the state.

Theory of operation
-------------------
The root (``simple/index.html``, ``index.v1_html``, ``index.v1_json``) lists
every project, 600k on PyPI, so it is the one page whose cost grows with the
size of the index rather than with the changes.  ``write_root`` runs in a
worker thread (one hop) and:

* reads ``projects`` through a read-only SQLite connection of its own; WAL
  lets it read the committed state while the trio thread keeps the main
  connection, which is never touched from this thread;
* renders both formats from that one ordered scan with ``render.iter_root``
  and streams them into temp files in ``state/tmp/``, so memory stays flat
  whatever the number of projects;
* writes the HTML once: ``index.v1_html`` is a hard link to the same temp;
* hands the temps to ``Tree.commit_files``, which makes each durable before
  the first one is published (fsync then rename on disk, one PUT each in a
  bucket), so a full disk leaves the old root in place and a reader always
  sees a complete root.
"""

from __future__ import annotations

import os
from pathlib import Path

from mirror.errors import DiskError
from mirror.layout import ROOT_JSON, ROOT_PAGES
from mirror.publish import render
from mirror.publish.state import State
from mirror.publish.tree import Tree


def write_root(tree: Tree, db_path: Path, serial: int, *, html: bool = True) -> None:
    """Render the root from ``db_path`` and publish it atomically (blocking).

    ``html=False`` rewrites only the JSON root: the HTML root lists names
    without serials, so a cycle that only changed existing projects leaves it
    byte-for-byte the same and rendering it again would be wasted work."""
    html_tmp, link_tmp, json_tmp = tree.new_temp(), tree.new_temp(), tree.new_temp()
    temps = (html_tmp, link_tmp, json_tmp)
    reader = State.open_readonly(db_path)
    try:
        with open(html_tmp, "wb") as h, open(json_tmp, "wb") as j:
            for html_chunk, js in render.iter_root(reader.root_entries(), serial=serial, html=html):
                if html:
                    h.write(html_chunk)
                j.write(js)
        os.link(html_tmp, link_tmp)
    except OSError as e:
        for tmp in temps:
            tree.discard(tmp)
        raise DiskError.of(e, "writing the root index") from None
    finally:
        reader.close()
    chosen = []
    for tmp, rel in zip(temps, ROOT_PAGES):
        if html or rel == ROOT_JSON:
            chosen.append((tmp, rel))
        else:
            tree.discard(tmp)
    tree.commit_files(chosen)  # discards the temps itself on an error
