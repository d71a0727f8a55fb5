"""Where a project keeps its work, and the start-up every doit run shares.

build/       intermediates (build/<name>/*.json) and the hash cache (build/.hashes)
converted/   default output root
reports/     latest.json, latest.md and dated copies of the last runs
logs/        pipeline.log, rotated
.run.lock    held by the run in progress
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from pipeline import hashing, logs, report, run_lock

EXIT_LOCKED = 75  # EX_TEMPFAIL: try again once the other run is over
EXIT_TERMINATED = 128 + signal.SIGTERM


@dataclass(frozen=True)
class Project:
    root: Path

    @property
    def build(self) -> Path:
        return self.root / "build"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def lock(self) -> Path:
        return self.root / ".run.lock"

    @property
    def hashes(self) -> Path:
        return self.build / ".hashes"


_current: Project | None = None


def start(root: Path, argv: list[str]) -> Project:
    """Set up logging, the hash cache and signals; take the run lock unless doit only reads.

    Read-only commands (`doit list`, `doit dry-run`, ...) log to stderr only and write
    nothing.
    """
    global _current
    project = Project(Path(root).resolve())
    runs = run_lock.needs_lock(argv)
    logs.configure(project.logs if runs else None)
    hashing.set_cache_dir(project.hashes)
    _current = project
    if not runs:
        return project
    try:
        run_lock.acquire(project.lock)
    except run_lock.RunLocked as held:
        logger.error(
            f"another doit run is converting in {project.root} ({held}); "
            "this one stops without touching anything. Wait for it to "
            "finish, or stop it if it is stuck"
        )
        raise SystemExit(EXIT_LOCKED) from None
    signal.signal(signal.SIGTERM, _terminated)
    sys.excepthook = _quiet_interrupt
    return project


def refuse(message: str) -> None:
    """Record a run stopped before any work (a config mistake): the log and a report."""
    logger.bind(console=False).error(message)
    if _current is not None and run_lock.held():
        report.write_refusal(_current.reports, message)


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (cron's timeout, a shutdown) ends the run as Ctrl-C does: reported."""
    raise SystemExit(EXIT_TERMINATED)


def _quiet_interrupt(kind: type, value: BaseException, traceback: object) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.stderr.write("interrupted; reports/latest.md says what finished\n")
        return
    sys.__excepthook__(kind, value, traceback)


def current() -> Project:
    if _current is None:
        raise RuntimeError("pipeline.project.start() was not called (dodo.py does it)")
    return _current
