"""Where eaglespec keeps what it derives once and reuses: converted targets, probe results."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

#: probe outcomes kept per machine; the oldest go first
MAX_PROBE_ENTRIES = 64


def cache_root() -> Path:
    """$EAGLESPEC_CACHE, else ~/.cache/eaglespec."""
    env = os.environ.get("EAGLESPEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "eaglespec"


class ProbeCache:
    """Probe outcomes of one entry (e.g. a model's weights) on one machine, in
    cache_root()/probes/MACHINE.json ({entry: {name: outcome}}). entry None: nothing is read or
    kept (a model built in memory is probed every time)."""

    def __init__(self, machine: str, entry: str | None) -> None:
        self.path = cache_root() / "probes" / f"{machine}.json"
        self.entry = entry
        self.found = self._read().get(entry, {}) if entry else {}
        self.new: dict = {}

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, name: str, default=None, kind: type = object):
        """The cached outcome `name` if it is None or a `kind`, else `default` (probe again)."""
        value = self.found.get(name, default)
        return value if value is None or isinstance(value, kind) else default

    def put(self, name: str, outcome) -> None:
        if name not in self.found or self.found[name] != outcome:  # a warm load writes nothing
            self.new[name] = outcome

    def save(self) -> None:
        """Merge the new outcomes into the file (atomically; a race loses an entry, never the file)."""
        if not self.entry or not self.new:
            return
        table = self._read()
        table.pop(self.entry, None)
        table[self.entry] = {**self.found, **self.new}  # last, as the newest
        while len(table) > MAX_PROBE_ENTRIES:
            table.pop(next(iter(table)))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".probes-")
            with os.fdopen(fd, "w") as f:
                json.dump(table, f)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only cache only costs the probes next time
            log.info("could not cache probe results in %s: %s", self.path, e)
