"""flatten: give every kept tensor its canonical, flat name.

Strips the prefixes that distributed training and wrappers add (`module.`, `model.`),
checks that no two entries land on one name, and writes `flat.json` sorted by name.
"""

from __future__ import annotations

from loguru import logger

from pipeline.errors import ConversionError
from pipeline.files import read_json, write_json
from pipeline.rules import canonical_name
from pipeline.stages import Job


def run(job: Job) -> None:
    loaded = read_json(job.load_json)
    tensors: dict[str, dict] = {}
    prefixes = set()
    for entry in loaded["kept"]:
        key = entry["key"]
        name = canonical_name(key)
        if name in tensors:
            raise ConversionError(
                f"{job.source}: {tensors[name]['key']!r} and {key!r} "
                f"both become {name!r} once their prefix is removed"
            )
        tensors[name] = {"key": key, "shape": entry["shape"], "dtype": entry["dtype"]}
        prefixes.add(key[: len(key) - len(name)])
    stripped = sorted(prefix for prefix in prefixes if prefix)
    logger.info(
        f"{len(tensors)} tensors named"
        + (f" (prefix {', '.join(map(repr, stripped))} removed)" if stripped else "")
    )
    write_json(job.flat_json, {"tensors": dict(sorted(tensors.items()))}, indent=1)
