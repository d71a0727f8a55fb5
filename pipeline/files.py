"""Writing artifacts so that a reader only ever sees a finished file.

Every artifact is written to a temporary file in its own folder and renamed onto its
final name once complete. A crash or an error leaves the earlier good file in place,
and the temporary file is removed (or, after a kill, by the next run).
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import OutputError

TEMP_NAME = re.compile(r"\..+\.tmp-(?P<pid>\d+)")
FILE_MODE = 0o644  # safetensors creates its files readable by their owner only
WRITER_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")
WRITER_TEMP_AGE = 60


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside target; it becomes target when the block succeeds.

    NOTE: the file is not fsync'ed before the rename. That protects against a killed
    process, which is what happens on a build box, not against a power cut; syncing a
    256 MB file would cost more than the rest of its conversion.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(error, target.parent) from error
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield temp
        os.chmod(temp, FILE_MODE)
        os.replace(temp, target)
    except OSError as error:
        raise output_error(error, target.parent) from error
    finally:
        temp.unlink(missing_ok=True)


def output_error(error: BaseException, folder: Path) -> OutputError:
    """An OutputError naming the folder; a full disk is said in so many words."""
    text = str(error)
    if (
        getattr(error, "errno", None) == errno.ENOSPC
        or "os error 28" in text
        or "No space left" in text
    ):
        return OutputError(
            f"no space left on the device while writing into {folder}; "
            "free some space and run again (earlier outputs are intact)"
        )
    reason = getattr(error, "strerror", None) or text
    return OutputError(f"cannot write into {folder}: {reason}")


def write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as temp:
        temp.write_bytes(data)


def json_bytes(value: Any, indent: int = 4) -> bytes:
    return (json.dumps(value, indent=indent) + "\n").encode("utf-8")


def write_json(target: Path, value: Any, indent: int = 4) -> None:
    write_bytes(target, json_bytes(value, indent))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def remove_stale_temps(folder: Path, *, writer_temps: bool = False) -> list[Path]:
    """Delete temporary files that a killed process left behind in folder.

    With `writer_temps`, also the `.tmpXXXXXX` files safetensors writes before renaming
    them onto our own temporary file, once they are a minute old: a file that old in an
    output folder only this pipeline writes to belongs to a write that was killed.
    """
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        found = TEMP_NAME.fullmatch(path.name)
        stale = found is not None and not _alive(int(found["pid"]))
        if writer_temps and WRITER_TEMP.fullmatch(path.name) and path.is_file():
            stale = time.time() - path.stat().st_mtime > WRITER_TEMP_AGE
        if stale:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
