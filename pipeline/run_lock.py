"""One doit run at a time per project.

The lock is an flock on the project's .run.lock, taken when dodo.py loads (before doit
opens its state) and released by the kernel when the process ends, however it ends.
The file also records who holds it, so the refused run can say so.
"""

from __future__ import annotations

import fcntl
import os
from datetime import datetime
from pathlib import Path

# Commands that only read: they never wait for or block a conversion.
READ_ONLY_COMMANDS = {"list", "help", "info", "dumpdb", "tabcompletion", "dry-run"}
# doit options that take a value, so that value is not mistaken for a command.
VALUE_OPTIONS = {
    "-f",
    "--file",
    "-d",
    "--dir",
    "--db-file",
    "--backend",
    "--codec-cls",
    "--check_file_uptodate",
    "-k",
    "--seek-file",
}

_held: int | None = None


class RunLocked(Exception):
    """Another run holds the lock."""


def needs_lock(argv: list[str]) -> bool:
    """False for doit commands that only read, such as `doit list`."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-") and "=" not in arg:
            return arg not in READ_ONLY_COMMANDS
    return True


def held() -> bool:
    return _held is not None


def acquire(path: Path) -> None:
    """Take the lock for this process or raise RunLocked naming the holder."""
    global _held
    if _held is not None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLocked(holder) from None
    os.ftruncate(fd, 0)
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    os.write(fd, f"pid {os.getpid()}, started {started}\n".encode())
    _held = fd
