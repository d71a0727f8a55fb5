"""load: open the checkpoint safely, find its state dict, keep the decoder's tensors.

Writes `load.json`: where the state dict sits, the kept entries (key, shape, dtype and
where their bytes lie in the file), how many were dropped and why, and the source's
size and sha256. The hash runs in a child process while torch is imported and
unpickles, so it adds little wall time of its own.
"""

from __future__ import annotations

import time
from collections import Counter

from loguru import logger

from pipeline.checkpoint import describe, find_state_dict, locate, open_checkpoint, sniff
from pipeline.files import write_json
from pipeline.hashing import BackgroundHash
from pipeline.rules import canonical_name, drop_reason
from pipeline.stages import Job

MIB = 1 << 20


def run(job: Job) -> None:
    fmt = sniff(job.source)
    stat = job.source.stat()
    source_hash = BackgroundHash(job.source)
    try:
        loaded = open_checkpoint(job.source, trusted=job.trusted, kind=fmt)
        at, state_dict = find_state_dict(loaded.content, job.source)
    except BaseException:
        source_hash.cancel()
        raise
    kept, dropped = {}, Counter()
    for key, value in state_dict.items():
        if not hasattr(value, "shape") or not isinstance(key, str):
            dropped["not a tensor"] += 1
            continue
        reason = drop_reason(canonical_name(key))
        if reason:
            dropped[reason] += 1
        else:
            kept[key] = value
    kept_bytes = sum(t.numel() * t.element_size() for t in kept.values())
    summary = "; ".join(f"{count} {reason}" for reason, count in dropped.most_common())
    logger.info(
        f"state dict at {describe(at)}: kept {len(kept)} of {len(state_dict)} "
        f"tensors ({kept_bytes / MIB:.1f} MiB), dropped {sum(dropped.values())}"
        + (f": {summary}" if summary else "")
    )
    for reason in dropped:
        if reason.startswith("not part of the decoder"):
            logger.warning(f"dropped {dropped[reason]} tensor(s) {reason}")
    locations = locate(job.source, kept) if fmt == "zip" else None
    waiting = time.perf_counter()
    digest = source_hash.result()
    logger.debug(f"waited {time.perf_counter() - waiting:.2f} s for the source's sha256")
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
