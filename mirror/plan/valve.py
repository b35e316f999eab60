"""The safety valve: refuse a cycle that would delete too much at once.

A broken or compromised upstream (an empty root index, pages served without
files, a mass "remove project") must not empty the mirror that thousands of
machines install from.  During a cycle every *destructive* change - a project
removal, or a page that drops files - is held back until all projects have
been fetched; then ``decide`` looks at the totals.  If the cycle would make
more than ``[mirror] max_retire`` files unreferenced, or remove more than
``MASS_REMOVE_FRACTION`` of the published projects, none of the held changes
is published: they stay queued (and are retried every cycle), the gauge
``mirror_retirement_blocked`` is 1 and the log says why.  Additions are not
held: they cannot hurt a reader.  ``mirror sync --allow-mass-delete`` lets
one cycle through.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

MASS_REMOVE_FRACTION = 0.10
# Below this many removals the fraction is not checked, so that a small
# mirror (or a test corpus of five projects) can lose one project.
MASS_REMOVE_MIN = 10


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    reason: str = ""  # why it is (or would have been) blocked
    overridden: bool = False  # allowed only because of --allow-mass-delete


def decide(*, retiring: int, removing: int, projects: int, max_retire: int, allow: bool = False) -> Verdict:
    """Should the held destructive changes of one cycle be published?

    ``retiring``: files that would become unreferenced; ``removing``: published
    projects that would be removed; ``projects``: projects published now.
    """
    reasons = []
    if retiring > max_retire:
        reasons.append(f"{retiring} files would be retired (max_retire = {max_retire})")
    if removing > MASS_REMOVE_MIN and removing > MASS_REMOVE_FRACTION * projects:
        share = 100.0 * removing / max(projects, 1)
        reasons.append(
            f"{removing} of {projects} projects ({share:.0f}%) would be removed "
            f"(limit {MASS_REMOVE_FRACTION:.0%})"
        )
    if not reasons:
        return Verdict(True)
    reason = "; ".join(reasons)
    return Verdict(allow, reason, overridden=allow)
