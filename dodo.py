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
from pipeline.configs import read_configs
from pipeline.errors import ConfigError
from pipeline.hashing import ContentChecker
from pipeline.report import RunReporter
from pipeline.stages import STAGES, Job, run_stage, stage_module
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
    ENTRIES = read_configs(CONFIGS, ROOT)
except ConfigError as error:
    raise InvalidDodoFile(str(error)) from None
JOBS = [Job.of(entry, PROJECT.build) for entry in ENTRIES]
# One checkpoint's stages after the other's, so a batch reads in order and frees memory.
DOIT_CONFIG["default_tasks"] = [f"{stage}:{job.name}" for job in JOBS for stage in STAGES]


def _subtask(stage, position, job, file_dep, targets, settings=None):
    """One stage of one checkpoint, rerun when its inputs, settings or code change."""
    return {
        "name": job.name,
        "actions": [(run_stage, [stage, job])],
        "file_dep": [str(path) for path in file_dep],
        "targets": [str(path) for path in targets],
        "uptodate": [config_changed({"code": fingerprint(stage_module(stage)), **(settings or {})})],
        "clean": True,
        "meta": {"checkpoint": job.name, "stage": stage, "position": position,
                 "source": str(job.source), "output": str(job.output)},
    }


def task_sample():
    """Generate the synthetic checkpoints that config entries ask for with `sample`."""
    for position, (entry, job) in enumerate(zip(ENTRIES, JOBS)):
        if entry.sample:
            yield {
                "name": job.name,
                "actions": [(write_sample, [str(entry.source), entry.sample, job.name])],
                "targets": [str(entry.source)],
                "uptodate": [config_changed({"release": entry.sample,
                                             "code": fingerprint("pipeline.synthetic")})],
                "clean": True,
                "meta": {"checkpoint": job.name, "stage": "sample", "position": position,
                         "source": str(job.source), "output": str(job.output)},
            }


def task_load():
    """Open each checkpoint safely, find its state dict, keep the decoder's tensors."""
    for position, job in enumerate(JOBS):
        yield _subtask("load", position, job, [job.source], [job.load_json],
                       {"source": str(job.source), "trusted": job.trusted})


def task_flatten():
    """Give every kept tensor its canonical name (prefixes like module. removed)."""
    for position, job in enumerate(JOBS):
        yield _subtask("flatten", position, job, [job.load_json], [job.flat_json])


def task_transform():
    """Apply the rename, reshape and bandwidth-row rules; read the decoder's sizes."""
    for position, job in enumerate(JOBS):
        yield _subtask("transform", position, job, [job.flat_json], [job.plan_json],
                       {"bandwidth_id": job.bandwidth_id})


def task_save_safetensors():
    """Write model.safetensors (and provenance.json) into each output folder."""
    for position, job in enumerate(JOBS):
        yield _subtask("save_safetensors", position, job,
                       [job.source, job.load_json, job.plan_json],
                       [job.model, job.provenance, job.saved_json], {"entry": job.settings})


def task_write_index():
    """Write index.json (total size and weight map) beside model.safetensors."""
    for position, job in enumerate(JOBS):
        yield _subtask("write_index", position, job, [job.saved_json], [job.index])


def task_write_config():
    """Write config.json for llama.cpp, every size read from the checkpoint."""
    for position, job in enumerate(JOBS):
        yield _subtask("write_config", position, job, [job.plan_json], [job.config])
