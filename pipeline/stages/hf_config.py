"""write_config: config.json for llama.cpp, every size read from the checkpoint."""

from __future__ import annotations

from loguru import logger

from pipeline.files import read_json, write_json
from pipeline.rules import Dims
from pipeline.stages import Job


def run(job: Job) -> None:
    dims = Dims(**read_json(job.plan_json)["dims"])
    write_json(job.config, dims.hf_config())
    logger.info(
        f"wrote {job.config} (hidden_size {dims.head}, {dims.convnext_layers} "
        f"layers, vocab {dims.vocab})"
    )
