"""Where a project keeps its work, and the start-up every doit run shares.

build/      intermediates (build/<name>/*.json), the hash cache, the run lock
converted/  default output root
reports/    latest.json, latest.md and dated copies of the last runs
logs/       pipeline.log, rotated
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from pipeline import hashing, logs, run_lock

EXIT_LOCKED = 75  # EX_TEMPFAIL: try again once the other run is over


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
        return self.build / "run.lock"

    @property
    def hashes(self) -> Path:
        return self.build / "hashes"


_current: Project | None = None


def start(root: Path, argv: list[str]) -> Project:
    """Set up logging and the hash cache; take the run lock unless doit only reads."""
    global _current
    project = Project(Path(root).resolve())
    logs.configure(project.logs)
    hashing.set_cache_dir(project.hashes)
    if run_lock.needs_lock(argv):
        try:
            run_lock.acquire(project.lock)
        except run_lock.RunLocked as held:
            logger.error(
                f"another doit run is converting in {project.root} ({held}); "
                "this one stops without touching anything. Wait for it to "
                "finish, or stop it if it is stuck"
            )
            raise SystemExit(EXIT_LOCKED) from None
    _current = project
    return project


def current() -> Project:
    if _current is None:
        raise RuntimeError("pipeline.project.start() was not called (dodo.py does it)")
    return _current
