"""Notice active-version switches made by other processes (`edge-agent rollback`, `activate`, `install`).

The daemon polls the store's active pointers (``models/*/active.json``) once a second by ``stat``: a
pointer is replaced by rename, so a switch changes its inode and mtime. What changed since the last look
that the daemon did not do itself is reported to the hub at once (``ReportedModel.origin = "local"``).
"""

from __future__ import annotations

import os

from edge_agent.store import ActiveRecord, ModelStore

Stamp = tuple[int, int, int]


class ActiveWatch:
    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.seen = self._stamps()

    def _stamps(self) -> dict[str, Stamp]:
        stamps: dict[str, Stamp] = {}
        for name in self.store.names():
            try:
                st = os.stat(self.store.active_path(name))
            except OSError:
                continue
            stamps[name] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return stamps

    def mark_seen(self, *names: str) -> None:
        """The daemon's own switch of ``names`` (all models when none are named): call it right after the
        switch, never later, or a foreign switch made in between would be taken for the daemon's own."""
        now = self._stamps()
        if not names:
            self.seen = now
            return
        for name in names:
            if name in now:
                self.seen[name] = now[name]
            else:
                self.seen.pop(name, None)

    def changed(self) -> dict[str, ActiveRecord]:
        """Models whose active pointer changed since the last look, with their new record."""
        now = self._stamps()
        names = [name for name, stamp in now.items() if self.seen.get(name) != stamp]
        self.seen = now
        found = {}
        for name in names:
            try:
                record = self.store.active(name)
            except (OSError, ValueError, TypeError):  # caught mid-write by a foreign tool: next look
                continue
            if record is not None:
                found[name] = record
        return found
