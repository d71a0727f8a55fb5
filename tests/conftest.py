"""Shared fixtures: tiny checkpoints and throwaway doit projects."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from loguru import logger

from pipeline import hashing, synthetic

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def quiet_logs():
    """Route loguru to pytest's captured stderr for each test; no file sinks."""
    logger.remove()
    logger.configure(extra={"checkpoint": "-", "stage": "test"})
    handler = logger.add(
        sys.stderr, level="DEBUG", format="{level} {extra[checkpoint]} {extra[stage]}: {message}"
    )
    hashing.set_cache_dir(None)
    yield
    logger.remove(handler)


@pytest.fixture
def messages():
    """Every log line of the test, as (level, message)."""
    lines: list[tuple[str, str]] = []
    sink = logger.add(
        lambda m: lines.append((m.record["level"].name, m.record["message"])), level="DEBUG"
    )
    yield lines
    logger.remove(sink)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    """One tiny checkpoint for read-only use by many tests."""
    return synthetic.write_tiny(tmp_path_factory.mktemp("tiny") / "tiny.ckpt")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_path):
    import torch

    return torch.load(tiny_path, weights_only=True)


class Project:
    """A throwaway project folder: dodo.py, configs/, and doit run in a subprocess."""

    def __init__(self, root: Path) -> None:
        self.root = root
        shutil.copy(REPO / "dodo.py", root / "dodo.py")
        (root / "configs").mkdir()
        (root / "ckpts").mkdir()

    def config(self, text: str, name: str = "team.toml") -> Path:
        path = self.root / "configs" / name
        path.write_text(text)
        return path

    def checkpoint(self, name: str, seed: int = 0, **options) -> Path:
        return synthetic.write_tiny(self.root / "ckpts" / name, seed=seed, **options)

    def doit(
        self, *args: str, env: dict | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "doit", *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )

    def report(self) -> dict:
        return json.loads((self.root / "reports" / "latest.json").read_text())

    def ran(self) -> dict[str, list[str]]:
        """Per checkpoint, the stages the last run executed, from its report."""
        return {
            row["name"]: [
                stage for stage, record in row["stages"].items() if record["status"] == "ran"
            ]
            for row in self.report()["checkpoints"]
        }

    def output(self, name: str) -> Path:
        return self.root / "converted" / name

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """mtime and size of every file the pipeline made (the run lock aside)."""
        found = {}
        for folder in ("build", "converted"):
            for path in sorted((self.root / folder).rglob("*")):
                if path.is_file() and path.name != "run.lock":
                    stat = path.stat()
                    found[str(path.relative_to(self.root))] = (stat.st_mtime_ns, stat.st_size)
        return found


@pytest.fixture
def project(tmp_path) -> Project:
    return Project(tmp_path)


@pytest.fixture(scope="session")
def reference() -> dict:
    path = SHARED / "reference" / "large-320-24k-4096.hf.json"
    if not path.exists():
        pytest.skip(f"{path} is not beside this checkout")
    return json.loads(path.read_text())
