"""Logging setup, done once by each entry point (dodo.py, the command line).

Pipeline modules only import loguru's `logger` and bind the checkpoint and stage; the
sinks live here: one readable line per event on stderr, and a rotating file under
logs/ with the same lines plus debug detail and tracebacks. A record bound with
`console=False` goes to the file only (doit already printed it).
"""

from __future__ import annotations

import sys
from pathlib import Path

from loguru import logger

CONSOLE_FORMAT = (
    "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> "
    "<cyan>{extra[checkpoint]}</cyan> {extra[stage]}: <level>{message}</level>"
)
FILE_FORMAT = (
    "{time:YYYY-MM-DD HH:mm:ss.SSS} {process} {level: <7} "
    "{extra[checkpoint]} {extra[stage]}: {message}"
)


def configure(log_dir: Path | None, *, level: str = "INFO") -> None:
    """Send logs to stderr at `level` and, when log_dir is given, to a rotating file."""
    logger.remove()
    logger.configure(extra={"checkpoint": "-", "stage": "run"})
    logger.add(
        sys.stderr,
        level=level,
        format=CONSOLE_FORMAT,
        backtrace=False,
        diagnose=False,
        filter=lambda record: record["extra"].get("console", True),
    )
    if log_dir is None:
        return
    try:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        logger.warning(
            f"no log file: cannot create {log_dir} ({error.strerror}); logging to stderr only"
        )
        return
    logger.add(
        Path(log_dir) / "pipeline.log",
        level="DEBUG",
        format=FILE_FORMAT,
        rotation="10 MB",
        retention=10,
        enqueue=True,
        backtrace=True,
        diagnose=False,
    )
