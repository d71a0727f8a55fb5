"""transform: apply the conversion rules and read the decoder's sizes.

Writes `plan.json`: for every output tensor its name, its source, the row of a
per-bandwidth table it takes and its final shape; and the sizes config.json needs.
"""

from __future__ import annotations

from dataclasses import asdict

from loguru import logger

from pipeline.errors import ConversionError
from pipeline.files import read_json, write_json
from pipeline.rules import plan
from pipeline.stages import Job


def run(job: Job) -> None:
    flat = read_json(job.flat_json)["tensors"]
    shapes = {name: tensor["shape"] for name, tensor in flat.items()}
    dtypes = {name: tensor["dtype"] for name, tensor in flat.items()}
    try:
        dims, planned = plan(shapes, dtypes, job.bandwidth_id)
    except ConversionError as error:
        raise ConversionError(f"{job.source}: {error}") from error
    if not dims.norm_rows and job.bandwidth_id:
        logger.warning(
            f"bandwidth_id {job.bandwidth_id} ignored: this model's norms are "
            "plain LayerNorms, not per-bandwidth tables"
        )
    renamed = sum(item.name != item.source for item in planned)
    reshaped = sum(item.shape != flat[item.source]["shape"] for item in planned)
    logger.info(
        f"{len(planned)} output tensors: {renamed} renamed, {reshaped} reshaped; "
        f"{dims.convnext_layers} ConvNeXt blocks of {dims.channels}, "
        f"head {dims.head}"
        + (
            f", bandwidth row {job.bandwidth_id} of {dims.norm_rows}"
            if dims.norm_rows
            else ", plain norms"
        )
    )
    write_json(
        job.plan_json,
        {
            "bandwidth_id": job.bandwidth_id,
            "dims": asdict(dims),
            "tensors": [
                {
                    **asdict(item),
                    "key": flat[item.source]["key"],
                    "source_shape": flat[item.source]["shape"],
                }
                for item in planned
            ],
        },
        indent=1,
    )
