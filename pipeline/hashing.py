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
import subprocess
import sys
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
    digest = cached(path, stat)
    if digest is None:
        started = time.perf_counter()
        with path.open("rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
        remember(path, stat, digest, time.perf_counter() - started)
    return digest


def unchanged(path: Path, size: int, mtime_ns: int, digest: str) -> bool:
    """Is the file still the version recorded as (size, mtime_ns, sha256)?

    A moved timestamp alone is checked by content, through the cache.
    """
    stat = Path(path).stat()
    if stat.st_size != size:
        return False
    return stat.st_mtime_ns == mtime_ns or sha256(path) == digest


def cached(path: Path, stat: os.stat_result) -> str | None:
    """The cached sha256 of this version of the file, or None."""
    entry = _cache_entry(path)
    if entry is None:
        return None
    try:
        value = json.loads(entry.read_text())
    except (OSError, ValueError):
        return None
    return value.get("sha256") if value.get("version") == _version(stat) else None


def remember(path: Path, stat: os.stat_result, digest: str, seconds: float) -> None:
    """Cache a digest, if the file is still the version that was hashed."""
    logger.debug(f"hashed {path} ({stat.st_size / (1 << 20):.1f} MiB) in {seconds:.2f} s")
    entry = _cache_entry(path)
    if (
        entry is None
        or stat.st_size < CACHED_FROM_BYTES
        or _version(path.stat()) != _version(stat)
    ):
        return
    _store(entry, {"path": str(path.absolute()), "version": _version(stat), "sha256": digest})


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
        temp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
        temp.write_text(json.dumps(value))
        os.replace(temp, entry)
    except OSError:
        pass  # a cache that cannot be written only costs a second hash


# A child interpreter that only hashes: started in milliseconds (-I -S), and on its own
# core without sharing a GIL with torch's import and unpickling in the parent.
HASH_PROGRAM = (
    "import hashlib, sys\n"
    "with open(sys.argv[1], 'rb') as f:\n"
    "    print(hashlib.file_digest(f, 'sha256').hexdigest())\n"
)


class BackgroundHash:
    """Hash a file in a child process while the caller does its own work."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stat = self.path.stat()
        self._digest = cached(self.path, self._stat)
        self._started = time.perf_counter()
        self._process = None
        if self._digest is None:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", HASH_PROGRAM, str(self.path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

    def result(self) -> str:
        if self._digest is not None:
            return self._digest
        out, err = self._process.communicate()
        digest = out.strip()
        if self._process.returncode != 0 or len(digest) != 64:
            raise OSError(f"hashing {self.path} failed: {err.strip() or out.strip()}")
        remember(self.path, self._stat, digest, time.perf_counter() - self._started)
        self._digest = digest
        return digest

    def cancel(self) -> None:
        if self._process is not None and self._digest is None:
            self._process.kill()
            self._process.communicate()

    def __enter__(self) -> "BackgroundHash":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()  # a no-op once result() has the digest


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
