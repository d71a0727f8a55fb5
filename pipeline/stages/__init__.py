"""The six stages one checkpoint goes through, and how a stage is run.

Stages hand each other small JSON files under `build/<name>/`; only
save_safetensors reads tensor data, straight from the checkpoint.

    load              checkpoint  -> build/<name>/load.json   where the state dict is, what is kept
    flatten           load.json   -> build/<name>/flat.json   canonical names, shapes, dtypes
    transform         flat.json   -> build/<name>/plan.json   output names, shapes, rows; sizes
    save_safetensors  plan.json   -> <output>/model.safetensors, provenance.json;
                                     build/<name>/saved.json  its size and header hash
    write_index       saved.json  -> <output>/index.json
    write_config      plan.json   -> <output>/config.json
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed
from loguru import logger

from pipeline.errors import PipelineError

STAGES = ("load", "flatten", "transform", "save_safetensors", "write_index", "write_config")
MODULES = {
    "load": "load",
    "flatten": "flatten",
    "transform": "transform",
    "save_safetensors": "save",
    "write_index": "index",
    "write_config": "hf_config",
}


@dataclass(frozen=True)
class Job:
    """What the stages need to know of one checkpoint: plain values, safe to pickle."""

    name: str
    source: Path
    output: Path
    build: Path
    bandwidth_id: int = 0
    trusted: bool = False
    settings: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, entry: Any, build_root: Path) -> "Job":
        """The job for a resolved config entry (pipeline.configs.Entry)."""
        return cls(
            entry.name,
            entry.source,
            entry.output,
            build_root / entry.name,
            entry.bandwidth_id,
            entry.trusted,
            entry.settings(),
        )

    @property
    def load_json(self) -> Path:
        return self.build / "load.json"

    @property
    def flat_json(self) -> Path:
        return self.build / "flat.json"

    @property
    def plan_json(self) -> Path:
        return self.build / "plan.json"

    @property
    def saved_json(self) -> Path:
        return self.build / "saved.json"

    @property
    def model(self) -> Path:
        return self.output / "model.safetensors"

    @property
    def provenance(self) -> Path:
        return self.output / "provenance.json"

    @property
    def index(self) -> Path:
        return self.output / "index.json"

    @property
    def config(self) -> Path:
        return self.output / "config.json"


def stage_module(stage: str) -> str:
    return f"pipeline.stages.{MODULES[stage]}"


def run_stage(stage: str, job: Job) -> TaskFailed | None:
    """doit action: run one stage for one checkpoint, logging under its name.

    An input or output problem ends the task with its one-line message; any other
    exception is a bug and reaches doit with its traceback.
    """
    module = importlib.import_module(stage_module(stage))
    with logger.contextualize(checkpoint=job.name, stage=stage):
        started = time.perf_counter()
        logger.debug(f"started ({job.source})")
        try:
            module.run(job)
        except PipelineError as error:
            logger.error(str(error))
            return TaskFailed(str(error))
        except Exception:
            logger.exception("failed with an unexpected error (a bug in the pipeline)")
            raise
        logger.debug(f"finished in {time.perf_counter() - started:.2f} s")
    return None
