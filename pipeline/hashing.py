"""Content hashes that are computed once per file version, and doit's file checker.

A 2 GB checkpoint takes over a second to hash, so a file's sha256 is kept in a small
cache keyed by its path, size, inode and modification time. doit's own checker hashes
with md5 (twice as slow here) every time a timestamp moves and never remembers the
answer; `ContentChecker` asks the cache instead, so a checkpoint that was only touched
is hashed once, found unchanged, and not hashed again on later runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

from doit.dependency import FileChangedChecker
from loguru import logger

# Smaller files are hashed directly: reading the cache would cost as much.
CACHED_FROM_BYTES = 1 << 20

_cache_dir: Path | None = None


def set_cache_dir(folder: Path | None) -> None:
    """Where hashes of large files are remembered; None keeps no cache."""
    global _cache_dir
    _cache_dir = Path(folder) if folder is not None else None


def sha256(path: Path) -> str:
    """The file's sha256 in hex, from the cache when this version was hashed before."""
    path = Path(path)
    stat = path.stat()
    entry = _cache_entry(path)
    key = _version(stat)
    if entry is not None:
        try:
            cached = json.loads(entry.read_text())
            if cached.get("version") == key:
                return cached["sha256"]
        except (OSError, ValueError):
            pass
    started = time.perf_counter()
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    logger.debug(f"hashed {path} ({stat.st_size / (1 << 20):.1f} MiB) in "
                 f"{time.perf_counter() - started:.2f} s")
    if entry is not None and stat.st_size >= CACHED_FROM_BYTES and _version(path.stat()) == key:
        _store(entry, {"path": str(path.absolute()), "version": key, "sha256": digest})
    return digest


def _version(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev]


def _cache_entry(path: Path) -> Path | None:
    if _cache_dir is None:
        return None
    name = hashlib.sha1(str(path.absolute()).encode()).hexdigest()
    return _cache_dir / f"{name}.json"


def _store(entry: Path, value: dict) -> None:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        temp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        temp.write_text(json.dumps(value))
        os.replace(temp, entry)
    except OSError:
        pass  # a cache that cannot be written only costs a second hash


class BackgroundHash:
    """Hash a file on another core while the caller does its own work.

    hashlib releases the GIL while it hashes, so the thread runs in parallel with
    torch's import and unpickling.
    """

    def __init__(self, path: Path) -> None:
        self._result: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(Path(path),),
                                        name="sha256", daemon=True)
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            self._result = sha256(path)
        except BaseException as error:  # handed to the caller by result()
            self._error = error

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


class ContentChecker(FileChangedChecker):
    """doit file_dep checker: unchanged when the timestamp or the sha256 says so.

    The saved state is (mtime, size, sha256), the shape of doit's MD5Checker state.
    """

    def check_modified(self, file_path, file_stat, state):
        timestamp, size, digest = state
        if file_stat.st_mtime == timestamp:
            return False
        if file_stat.st_size != size:
            return True
        return digest != sha256(Path(file_path))

    def get_state(self, dep, current_state):
        stat = os.stat(dep)
        if current_state and current_state[0] == stat.st_mtime:
            return None
        return stat.st_mtime, stat.st_size, sha256(Path(dep))
