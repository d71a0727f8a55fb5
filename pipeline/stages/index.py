"""write_index: index.json beside model.safetensors, in the form the old script wrote."""

from __future__ import annotations

from loguru import logger

from pipeline.files import read_json, write_json
from pipeline.stages import Job


def index_for(model_size: int) -> dict:
    return {"total_size": model_size, "weight_map": {"model.safetensors": ["*"]}}


def run(job: Job) -> None:
    size = read_json(job.saved_json)["size"]
    write_json(job.index, index_for(size))
    logger.info(f"wrote {job.index} (total_size {size})")
