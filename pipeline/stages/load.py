"""load: open the checkpoint safely, find its state dict, keep the decoder's tensors.

Writes `load.json`: where the state dict sits, the kept entries (key, shape, dtype and
where their bytes lie in the file), how many were dropped and why, and the source's
size and sha256. The hash runs in a child process while torch is imported and
unpickles, so it adds little wall time of its own.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from loguru import logger

from pipeline.checkpoint import (
    check_records,
    describe,
    find_state_dict,
    locate,
    open_checkpoint,
    sniff,
)
from pipeline.errors import CheckpointError, ConversionError
from pipeline.files import read_json, write_json
from pipeline.hashing import BackgroundHash, unchanged
from pipeline.rules import canonical_name, drop_reason
from pipeline.stages import Job

MIB = 1 << 20


def extent(tensor) -> int:
    """Bytes from a tensor's first element to its last, whatever its strides."""
    if tensor.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return (last + 1) * tensor.element_size()


def run(job: Job) -> None:
    fmt = sniff(job.source)
    stat = job.source.stat()
    with BackgroundHash(job.source) as source_hash:
        loaded = open_checkpoint(job.source, trusted=job.trusted, kind=fmt)
        at, state_dict = find_state_dict(loaded.content, job.source)
        kept, dropped = select(job, at, state_dict)
        locations = locate(job.source, kept) if fmt == "zip" else None
        if locations:
            check_records(
                job.source,
                {key: (place["offset"], extent(kept[key])) for key, place in locations.items()},
            )
        waiting = time.perf_counter()
        digest = source_hash.result()
    logger.debug(f"waited {time.perf_counter() - waiting:.2f} s for the source's sha256")
    now = job.source.stat()
    if (now.st_size, now.st_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
        raise CheckpointError(f"{job.source}: changed while it was being read; run again")
    write_json(
        job.load_json,
        {
            "source": str(job.source),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": digest,
            "format": fmt,
            "placeholders": loaded.placeholders,
            "top_level_keys": [str(key) for key in loaded.content][:50]
            if isinstance(loaded.content, dict)
            else [],
            "state_dict_at": at,
            "kept": [
                {
                    "key": key,
                    "shape": list(t.shape),
                    "dtype": str(t.dtype).removeprefix("torch."),
                    **(locations[key] if locations else {}),
                }
                for key, t in kept.items()
            ],
            "dropped": dict(dropped),
        },
        indent=1,
    )


def select(job: Job, at: list, state_dict: dict) -> tuple[dict, Counter]:
    """The decoder's tensors, and the count of dropped ones by reason (logged)."""
    kept, dropped = {}, Counter()
    for key, value in state_dict.items():
        if not hasattr(value, "shape") or not isinstance(key, str):
            dropped["not a tensor"] += 1
            continue
        reason = drop_reason(canonical_name(key))
        if reason:
            dropped[reason] += 1
        elif str(value.layout) != "torch.strided":
            raise ConversionError(
                f"{job.source}: {key!r} is a {value.layout} tensor; the "
                "decoder's tensors must be dense"
            )
        else:
            kept[key] = value
    kept_bytes = sum(t.numel() * t.element_size() for t in kept.values())
    summary = "; ".join(f"{count} {reason}" for reason, count in dropped.most_common())
    logger.info(
        f"state dict at {describe(at)}: kept {len(kept)} of "
        f"{len(state_dict)} tensors ({kept_bytes / MIB:.1f} MiB), dropped "
        f"{sum(dropped.values())}" + (f": {summary}" if summary else "")
    )
    for reason in dropped:
        if reason.startswith("not part of the decoder"):
            logger.warning(f"dropped {dropped[reason]} tensor(s) {reason}")
    return kept, dropped


def describes_source(load_json: str) -> bool | None:
    """doit uptodate check: does load.json describe the source as it is now?

    doit records a file dependency's state after the task ends; a checkpoint replaced
    in that gap would otherwise pass as converted while load.json describes the old
    one. None (no opinion) when there is no load.json yet.
    """
    try:
        recorded = read_json(Path(load_json))
        return unchanged(
            Path(recorded["source"]), recorded["size"], recorded["mtime_ns"], recorded["sha256"]
        )
    except (OSError, ValueError, KeyError):
        return None
