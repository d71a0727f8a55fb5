"""Convert every WavTokenizer checkpoint listed in configs/*.toml into a llama.cpp folder.

    doit                         convert everything configured (only what changed)
    doit write_config            regenerate config.json for every checkpoint
    doit write_config:NAME       ... for one checkpoint (NAME as `doit list --all` shows)
    doit configs=DIR             read the checkpoint lists from DIR instead of configs/
    doit dry-run                 show what would run, and why, without running it
    doit -n 2                    convert two checkpoints at a time

The creators below only describe tasks; the work is in pipeline.stages.
"""

import sys
from pathlib import Path

from doit import get_var
from doit.exceptions import InvalidDodoFile
from doit.tools import config_changed

from pipeline import project
from pipeline.code_version import fingerprint
from pipeline.configs import check_command_line, read_configs
from pipeline.errors import ConfigError
from pipeline.hashing import ContentChecker
from pipeline.report import RunReporter
from pipeline.stages import STAGES, Job, run_stage, stage_module
from pipeline.stages.load import describes_source
from pipeline.synthetic import write_sample

ROOT = Path(__file__).resolve().parent
PROJECT = project.start(ROOT, sys.argv[1:])
CONFIGS = ROOT / (get_var("configs") or "configs")

DOIT_CONFIG = {
    "backend": "sqlite3-durable",
    "dep_file": str(ROOT / ".doit.db"),
    "check_file_uptodate": ContentChecker,
    "reporter": RunReporter,
    "continue": True,
    "verbosity": 1,
}

try:
    check_command_line(sys.argv[1:])
    ENTRIES = read_configs(CONFIGS, ROOT)
except ConfigError as error:
    project.refuse(str(error))
    raise InvalidDodoFile(str(error)) from None
JOBS = [Job.of(entry, PROJECT.build) for entry in ENTRIES]
# One checkpoint's stages after the other's, so a batch reads in order and frees memory.
DOIT_CONFIG["default_tasks"] = [f"{stage}:{job.name}" for job in JOBS for stage in STAGES]


def _meta(job, stage, position):
    """What the run report and `doit dry-run` read from a task."""
    return {"checkpoint": job.name, "stage": stage, "position": position,
            "source": str(job.source), "output": str(job.output)}


def _subtask(stage, position, job, *, file_dep, targets, settings=None, checks=()):
    """One stage of one checkpoint, rerun when its inputs, settings or code change."""
    code = fingerprint(stage_module(stage))
    return {
        "name": job.name,
        "doc": f"{job.source} -> {job.output}",
        "actions": [(run_stage, [stage, job])],
        "file_dep": [str(path) for path in file_dep],
        "targets": [str(path) for path in targets],
        "uptodate": [config_changed({"code": code, **(settings or {})}), *checks],
        "clean": True,
        "meta": _meta(job, stage, position),
    }


def task_sample():
    """Generate the synthetic checkpoints that config entries ask for with `sample`."""
    for position, (entry, job) in enumerate(zip(ENTRIES, JOBS, strict=True)):
        if entry.sample:
            yield {
                "name": job.name,
                "doc": f"{entry.sample}, generated once at {job.source}",
                "actions": [(write_sample, [str(job.source), entry.sample, job.name])],
                "targets": [str(job.source)],
                "uptodate": [True],  # never replaces a file that is already there
                "clean": True,
                "meta": _meta(job, "sample", position),
            }


def task_load():
    """Open each checkpoint safely, find its state dict, keep the decoder's tensors."""
    for position, job in enumerate(JOBS):
        yield _subtask("load", position, job, file_dep=[job.source], targets=[job.load_json],
                       settings={"source": str(job.source), "trusted": job.trusted},
                       checks=[(describes_source, [str(job.load_json)])])


def task_flatten():
    """Give every kept tensor its canonical name (prefixes like module. removed)."""
    for position, job in enumerate(JOBS):
        yield _subtask("flatten", position, job, file_dep=[job.load_json],
                       targets=[job.flat_json])


def task_transform():
    """Apply the rename, reshape and bandwidth-row rules; read the decoder's sizes."""
    for position, job in enumerate(JOBS):
        yield _subtask("transform", position, job, file_dep=[job.flat_json],
                       targets=[job.plan_json], settings={"bandwidth_id": job.bandwidth_id})


def task_save_safetensors():
    """Write model.safetensors (and provenance.json) into each output folder."""
    for position, job in enumerate(JOBS):
        yield _subtask("save_safetensors", position, job,
                       file_dep=[job.source, job.load_json, job.plan_json],
                       targets=[job.model, job.provenance, job.saved_json],
                       settings={"entry": job.settings})


def task_write_index():
    """Write index.json (total size and weight map) beside model.safetensors."""
    for position, job in enumerate(JOBS):
        yield _subtask("write_index", position, job, file_dep=[job.saved_json],
                       targets=[job.index])


def task_write_config():
    """Write config.json for llama.cpp, every size read from the checkpoint."""
    # NOTE: after save_safetensors too, so that a folder whose model could not be
    # written (someone else's, a full disk) never gets a config.json that does not match.
    for position, job in enumerate(JOBS):
        yield _subtask("write_config", position, job, file_dep=[job.plan_json, job.saved_json],
                       targets=[job.config])
