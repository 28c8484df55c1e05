"""sha256 fingerprints of files and folders, with the hash of each file cached by its identity.

An index records the fingerprint of its model (weights, config and tokenizer) and of its
training data, and every query checks the model's: hashing 90 MB of MiniLM weights costs about
0.2 s, more than the query itself, and a 1B-parameter model costs seconds. So each file's
digest is cached under its resolved path, size, inode, mtime and ctime (nanoseconds): a second
query re-reads nothing, and any write, rename over or ``touch`` of the file changes ctime,
which no user can set back, so a changed file is always hashed again. The cache is a small
JSON file in ``$LITE_INFLUENCE_CACHE`` (default ``~/.cache/lite-influence``), written
atomically; ``LITE_INFLUENCE_CACHE=off`` disables it. A damaged or unreadable cache is
ignored, never an error: it only saves time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

_CHUNK = 1 << 20
_CACHE_NAME = "file-hashes.json"
_MAX_ENTRIES = 2000


def _cache_file() -> Path | None:
    setting = os.environ.get("LITE_INFLUENCE_CACHE")
    if setting == "off":
        return None
    folder = Path(setting) if setting else Path.home() / ".cache" / "lite-influence"
    return folder / _CACHE_NAME


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _Cache:
    def __init__(self):
        self.file = _cache_file()
        self.entries: dict[str, list[str]] = {}
        self.changed = False
        if self.file is not None:
            try:
                loaded = json.loads(self.file.read_text(encoding="utf-8"))
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self.entries = {}

    def digest(self, path: Path) -> str:
        key, identity = str(path.resolve()), _identity(path)
        entry = self.entries.get(key)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == identity:
            return entry[1]
        value = _digest(path)
        if _identity(path) == identity:  # not written to while we read it
            self.entries[key] = [identity, value]
            self.changed = True
        return value

    def save(self) -> None:
        if self.file is None or not self.changed:
            return
        keep = dict(list(self.entries.items())[-_MAX_ENTRIES:])
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=".hashes.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(keep, handle)
            os.replace(tmp, self.file)
        except OSError:
            pass  # a read-only home: hashing still works, only slower


def fingerprint_files(root: Path, files: list[Path]) -> str:
    """One digest of ``files`` (their paths relative to ``root``, sizes and contents), so a
    renamed, moved or edited file all change it."""
    cache = _Cache()
    h = hashlib.sha256()
    for file in sorted(files, key=lambda f: f.relative_to(root).as_posix()):
        rel = file.relative_to(root).as_posix()
        h.update(rel.encode("utf-8") + b"\0" + file.stat().st_size.to_bytes(8, "little"))
        h.update(bytes.fromhex(cache.digest(file)))
    cache.save()
    return "sha256:" + h.hexdigest()


def fingerprint_path(path: Path) -> str:
    """Every file of a folder (hidden ones included), or a file: then its plain sha256, the
    value ``sha256sum`` prints, so a user can check a manifest's data fingerprint by hand."""
    path = Path(path)
    if path.is_dir():
        return fingerprint_files(path, [f for f in path.rglob("*") if f.is_file()])
    cache = _Cache()
    value = cache.digest(path)
    cache.save()
    return "sha256:" + value
