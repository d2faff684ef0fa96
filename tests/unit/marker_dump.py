"""A pytest plugin for tests/unit/test_ci_matrix.py: after collection, write every test's marker names as JSON
(``{node id: [marker, ...]}``) to the file ``PORTABLE_RL_MARKER_DUMP`` names. Load with ``-p marker_dump``."""

from __future__ import annotations

import json
import os
from pathlib import Path


def pytest_collection_finish(session) -> None:
    out = os.environ.get("PORTABLE_RL_MARKER_DUMP")
    if out:
        marks = {item.nodeid: sorted({m.name for m in item.iter_markers()}) for item in session.items}
        Path(out).write_text(json.dumps(marks), encoding="utf-8")
