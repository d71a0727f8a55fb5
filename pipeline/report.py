"""doit reporter: log each task, then write the run's report for the people who read it.

Every run writes reports/latest.json and reports/latest.md, plus dated copies of which
the last 30 are kept: per checkpoint its status (converted, up to date, failed with a
one-line reason, skipped because a stage it depends on failed), each stage's wall time,
input and output sizes; then totals. It is written from `complete_run`, which doit calls
also after failures and when the run is interrupted with Ctrl-C.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed, UnmetDependency
from loguru import logger

from pipeline import __version__, project
from pipeline.files import json_bytes, write_bytes

KEEP_REPORTS = 30
STAGE_ORDER = (
    "sample",
    "load",
    "flatten",
    "transform",
    "save_safetensors",
    "write_index",
    "write_config",
)


@dataclass
class StageRecord:
    status: str = "not run"  # ran, up to date, failed, skipped, interrupted, ignored
    seconds: float | None = None
    input_bytes: int = 0
    output_bytes: int = 0
    reason: str | None = None
    started: float | None = field(default=None, repr=False)


class RunReporter:
    """Takes doit's task events; see the module docstring."""

    desc = "log every stage and write reports/latest.{json,md}"

    def __init__(self, outstream: Any, options: dict) -> None:
        self.started_at = datetime.now(timezone.utc)
        self.clock = time.perf_counter()
        self.tasks: dict[str, Any] = {}
        self.records: dict[str, StageRecord] = {}
        self.errors: list[str] = []

    # doit's reporter interface

    def initialize(self, tasks: dict, selected_tasks: list) -> None:
        self.tasks = tasks

    def get_status(self, task: Any) -> None:
        self.records.setdefault(task.name, StageRecord())

    def execute_task(self, task: Any) -> None:
        record = self.records.setdefault(task.name, StageRecord())
        record.status, record.started = "interrupted", time.perf_counter()

    def add_success(self, task: Any) -> None:
        self._finish(task, "ran")

    def add_failure(self, task: Any, fail: Any) -> None:
        if isinstance(fail, UnmetDependency):
            self._finish(task, "skipped", f"a stage it depends on failed ({fail.message})")
            return
        reason = fail.message if isinstance(fail, TaskFailed) else _error_line(fail)
        self._finish(task, "failed", reason)
        if not isinstance(fail, TaskFailed):
            logger.bind(**_context(task)).error(reason)
            if fail.traceback:
                logger.bind(**_context(task)).debug("".join(fail.traceback).rstrip())

    def skip_uptodate(self, task: Any) -> None:
        self._finish(task, "up to date")
        logger.bind(**_context(task)).debug("up to date")

    def skip_ignore(self, task: Any) -> None:
        self._finish(task, "ignored")

    def cleanup_error(self, exception: Any) -> None:
        logger.error(f"teardown failed: {exception.get_msg()}")

    def runtime_error(self, msg: str) -> None:
        self.errors.append(msg)
        logger.error(msg)

    def teardown_task(self, task: Any) -> None:
        pass

    def complete_run(self) -> None:
        report = self.build_report()
        try:
            path = write_reports(project.current().reports, report, self.started_at)
        except Exception as error:  # a report that cannot be written must not hide the run
            logger.error(f"could not write the run report: {error}")
            path = None
        _log_summary(report, path)
        # NOTE: the run is over. With torch imported, the interpreter's final garbage
        # collections take a quarter of a second; frozen objects are skipped by them
        # (and still released by reference counting).
        gc.freeze()

    # building the report

    def _finish(self, task: Any, status: str, reason: str | None = None) -> None:
        record = self.records.setdefault(task.name, StageRecord())
        if record.started is not None:
            record.seconds = round(time.perf_counter() - record.started, 3)
        record.status, record.reason = status, reason
        record.input_bytes = _size(task.file_dep)
        record.output_bytes = _size(task.targets)

    def build_report(self) -> dict:
        checkpoints: dict[str, dict] = {}
        for name, record in self.records.items():
            task = self.tasks.get(name)
            meta = (task.meta or {}) if task is not None else {}
            if "checkpoint" not in meta:
                continue
            entry = checkpoints.setdefault(
                meta["checkpoint"],
                {
                    "name": meta["checkpoint"],
                    "source": meta.get("source"),
                    "output": meta.get("output"),
                    "stages": {},
                },
            )
            entry["stages"][meta["stage"]] = record
        rows = [_checkpoint_row(entry) for entry in checkpoints.values()]
        interrupted = any(row["status"] == "interrupted" for row in rows)
        failed = any(row["status"] in ("failed", "skipped") for row in rows) or self.errors
        return {
            "started": self.started_at.isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - self.clock, 3),
            "status": "interrupted" if interrupted else "failed" if failed else "ok",
            "converter": f"wavtokenizer-pipeline {__version__}",
            "errors": self.errors,
            "checkpoints": rows,
            "totals": _totals(rows),
        }


def _checkpoint_row(entry: dict) -> dict:
    stages = dict(sorted(entry["stages"].items(), key=lambda item: _stage_rank(item[0])))
    statuses = [record.status for record in stages.values()]
    failed = [(stage, record) for stage, record in stages.items() if record.status == "failed"]
    if failed:
        status, reason = "failed", f"{failed[0][0]}: {failed[0][1].reason}"
    elif "skipped" in statuses:
        status = "skipped"
        reason = next(r.reason for r in stages.values() if r.status == "skipped")
    elif "interrupted" in statuses:
        status, reason = "interrupted", "the run was stopped"
    elif any(record.status == "ran" for stage, record in stages.items() if stage != "sample"):
        status, reason = "converted", None
    elif statuses and all(s in ("up to date", "ignored", "ran") for s in statuses):
        status, reason = "up to date", None
    else:
        status, reason = "not run", None
    return {
        "name": entry["name"],
        "status": status,
        "reason": reason,
        "source": entry["source"],
        "output": entry["output"],
        "stages": {
            stage: {key: value for key, value in asdict(record).items() if key != "started"}
            for stage, record in stages.items()
        },
    }


def _stage_rank(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def _totals(rows: list[dict]) -> dict:
    totals: dict[str, Any] = {"checkpoints": len(rows)}
    for status in ("converted", "up to date", "failed", "skipped", "interrupted", "not run"):
        totals[status] = sum(row["status"] == status for row in rows)
    ran = [stage for row in rows for stage in row["stages"].values() if stage["seconds"]]
    totals["stage_seconds"] = round(sum(stage["seconds"] for stage in ran), 3)
    totals["source_bytes"] = sum(
        row["stages"].get("load", {}).get("input_bytes", 0) for row in rows
    )
    totals["output_bytes"] = sum(
        row["stages"].get(stage, {}).get("output_bytes", 0)
        for row in rows
        for stage in ("save_safetensors", "write_index", "write_config")
    )
    return totals


def _size(paths: Any) -> int:
    total = 0
    for path in paths:
        try:
            total += Path(path).stat().st_size
        except OSError:
            pass
    return total


def _context(task: Any) -> dict:
    meta = task.meta or {}
    return {"checkpoint": meta.get("checkpoint", "-"), "stage": meta.get("stage", task.name)}


def _error_line(fail: Any) -> str:
    lines = [line for line in "".join(fail.traceback).strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else fail.message
    return f"{fail.message}: {last} (an error in the pipeline; see logs/pipeline.log)"


def write_refusal(folder: Path, message: str) -> None:
    """The report of a run that stopped before any work, so no stale report stays latest."""
    started = datetime.now(timezone.utc)
    report = {
        "started": started.isoformat(timespec="seconds"),
        "seconds": 0.0,
        "status": "failed",
        "converter": f"wavtokenizer-pipeline {__version__}",
        "errors": [message],
        "checkpoints": [],
        "totals": _totals([]),
    }
    try:
        write_reports(folder, report, started)
    except Exception as error:  # the refusal itself is already on stderr and in the log
        logger.bind(console=False).error(f"could not write the run report: {error}")


def write_reports(folder: Path, report: dict, started: datetime) -> Path:
    """Write latest.{json,md} and the dated copies; keep the newest KEEP_REPORTS runs."""
    stamp = started.strftime("%Y%m%dT%H%M%S.%fZ")
    data, text = json_bytes(report, indent=2), render_markdown(report).encode()
    for name, content in (
        (f"run-{stamp}.json", data),
        (f"run-{stamp}.md", text),
        ("latest.json", data),
        ("latest.md", text),
    ):
        write_bytes(folder / name, content)
    for suffix in (".json", ".md"):
        dated = sorted(folder.glob(f"run-*{suffix}"))
        for old in dated[:-KEEP_REPORTS]:
            old.unlink(missing_ok=True)
    return folder / "latest.md"


def render_markdown(report: dict) -> str:
    totals = report["totals"]
    lines = [
        f"# Conversion run {report['started']}: {report['status']}",
        "",
        f"{totals['checkpoints']} checkpoint(s): {totals['converted']} converted, "
        f"{totals['up to date']} up to date, {totals['failed']} failed, "
        f"{totals['skipped']} skipped"
        + (f", {totals['interrupted']} interrupted" if totals["interrupted"] else "")
        + f". Wall time {report['seconds']:.1f} s; {report['converter']}.",
        "",
        "| checkpoint | status | reason | " + " | ".join(STAGE_ORDER[1:]) + " |",
        "|---|---|---|" + "---|" * (len(STAGE_ORDER) - 1),
    ]
    for row in report["checkpoints"]:
        cells = []
        for stage in STAGE_ORDER[1:]:
            record = row["stages"].get(stage)
            cells.append(_cell(record))
        reason = (row["reason"] or "").replace("|", "\\|")
        lines.append(f"| {row['name']} | {row['status']} | {reason} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Stage cells: wall seconds when the stage ran, `=` when it was up to date, "
        "`-` when it did not run; sizes are in reports/latest.json.",
    ]
    for error in report["errors"]:
        lines += ["", f"Error: {error}"]
    return "\n".join(lines) + "\n"


def _cell(record: dict | None) -> str:
    if record is None or record["status"] == "not run":
        return "-"
    if record["status"] == "up to date":
        return "="
    if record["seconds"] is not None:
        return f"{record['seconds']:.2f} s" + (
            "" if record["status"] == "ran" else f" {record['status']}"
        )
    return record["status"]


def _log_summary(report: dict, path: Path | None) -> None:
    totals = report["totals"]
    where = f"; report: {path}" if path else ""
    log = logger.info if report["status"] == "ok" else logger.error
    log(
        f"run {report['status']} in {report['seconds']:.1f} s: {totals['converted']} converted, "
        f"{totals['up to date']} up to date, {totals['failed']} failed, "
        f"{totals['skipped']} skipped{where}"
    )
    for row in report["checkpoints"]:
        if row["status"] in ("failed", "skipped", "interrupted"):
            logger.bind(checkpoint=row["name"]).error(f"{row['status'].upper()}: {row['reason']}")
