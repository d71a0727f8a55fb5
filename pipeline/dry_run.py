"""`doit dry-run`: which checkpoints and stages a run would execute, and why.

Nothing runs and nothing is written. A stage downstream of one that will run is shown
as waiting on it: it runs only if that stage's output comes out different.
"""

from __future__ import annotations

from typing import Any

from doit.cmd_base import DoitCmdBase
from doit.exceptions import InvalidCommand

from pipeline.report import STAGE_ORDER

# Our own uptodate checks, by function name; doit's config_changed is "settings or code".
CHECKS = {"describes_source": "the checkpoint changed since load read it"}
REASONS = {
    "has_no_dependencies": "always runs",
    "uptodate_false": "its settings or code changed",
    "checker_changed": "the file checker changed",
    "missing_target": "output missing: {}",
    "changed_file_dep": "input new or changed: {}",
    "missing_file_dep": "input missing: {}",
    "added_file_dep": "inputs added: {}",
    "removed_file_dep": "inputs removed: {}",
}


class DryRun(DoitCmdBase):
    name = "dry-run"
    doc_purpose = "show which checkpoints and stages would run, and why, without running"
    doc_usage = "[TASK ...]"
    doc_description = None
    cmd_options = ()

    def _execute(self, pos_args: list[str] | None = None) -> int:
        tasks = {task.name: task for task in self.task_list}
        producers = {target: name for name, task in tasks.items() for target in task.targets}
        chosen = self._closure(tasks, producers, self._selected(tasks, pos_args or []))
        will_run: set[str] = set()
        by_checkpoint: dict[str, list[tuple[str, str]]] = {}
        for name in sorted(chosen, key=lambda n: _order(tasks[n])):
            task = tasks[name]
            verdict = self._verdict(task, tasks, producers, will_run)
            meta = task.meta or {}
            by_checkpoint.setdefault(meta.get("checkpoint", name), []).append(
                (meta.get("stage", name), verdict)
            )
        for checkpoint, stages in by_checkpoint.items():
            busy = [stage for stage, verdict in stages if verdict != "up to date"]
            self.outstream.write(
                f"{checkpoint}: "
                + ("up to date\n" if not busy else f"{len(busy)} stage(s) may run\n")
            )
            for stage, verdict in stages:
                self.outstream.write(f"  {stage:<17} {verdict}\n")
        return 0

    def _verdict(self, task: Any, tasks: dict, producers: dict, will_run: set[str]) -> str:
        status = self.dep_manager.get_status(task, tasks, get_log=True)
        upstream = sorted(
            {producers[dep] for dep in task.file_dep if producers.get(dep) in will_run}
            | (set(task.task_dep) & will_run)
        )
        missing = [
            dep
            for dep in status.reasons.get("missing_file_dep", [])
            if producers.get(dep) not in will_run
        ]
        if status.status == "error" and missing:
            return "cannot run: " + _reasons(status.reasons)
        if status.status == "run":
            will_run.add(task.name)
            return "runs: " + _reasons(status.reasons)
        if upstream:
            will_run.add(task.name)
            return f"waits on {', '.join(upstream)}: runs if its output changes"
        return "up to date"

    @staticmethod
    def _selected(tasks: dict, names: list[str]) -> list[str]:
        if not names:
            return [name for name, task in tasks.items() if task.meta]
        selected = []
        for name in names:
            if name not in tasks:
                raise InvalidCommand(f"dry-run: no task named {name!r}; see `doit list --all`")
            subtasks = [sub for sub in tasks[name].task_dep if sub.startswith(name + ":")]
            selected += subtasks or [name]
        return selected

    @staticmethod
    def _closure(tasks: dict, producers: dict, names: list[str]) -> set[str]:
        chosen: set[str] = set()
        pending = list(names)
        while pending:
            name = pending.pop()
            if name in chosen:
                continue
            chosen.add(name)
            task = tasks[name]
            pending += [producers[dep] for dep in task.file_dep if dep in producers]
            pending += [dep for dep in task.task_dep if dep in tasks]
        return chosen


def _order(task: Any) -> tuple:
    meta = task.meta or {}
    stage = meta.get("stage", "")
    rank = STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)
    return meta.get("position", 0), rank, task.name


def _reasons(reasons: dict) -> str:
    parts = []
    for key, template in REASONS.items():
        value = reasons.get(key)
        if not value:
            continue
        if key == "uptodate_false":
            parts += [CHECKS.get(getattr(check, "__name__", ""), template) for check, *_ in value]
            continue
        items = value if isinstance(value, list) else []
        parts.append(template.format(", ".join(map(str, items))) if "{}" in template else template)
    return "; ".join(dict.fromkeys(parts)) or "not up to date"
