"""save_safetensors: write model.safetensors from the plan, and provenance.json.

The checkpoint is memory-mapped and only the planned tensors are touched, at the places
load recorded, without unpickling it again: rows and reshapes are views, so safetensors
writes straight from the mapped file and the process holds little more than one
output's worth of pages.

`build/<name>/saved.json` records the written file's size and header hash: all that
write_index needs, so no later step hashes 256 MB of output to see whether it changed.
"""

from __future__ import annotations

import hashlib
import json
import platform
import struct
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from loguru import logger

from pipeline import __version__
from pipeline.checkpoint import map_tensors, navigate, open_checkpoint
from pipeline.errors import ConversionError, OutputError
from pipeline.files import atomic_path, output_error, read_json, remove_stale_temps, write_json
from pipeline.hashing import unchanged
from pipeline.stages import Job

CONVERTER = f"wavtokenizer-pipeline {__version__}"
MIB = 1 << 20


def run(job: Job) -> None:
    for stale in remove_stale_temps(job.output, writer_temps=True):
        logger.info(f"removed {stale.name}, left behind by an interrupted run")
    check_output_folder(job.output, job.source.name)
    loaded = read_json(job.load_json)
    plan = read_json(job.plan_json)
    state_dict = source_tensors(job, loaded)
    tensors = {item["name"]: _planned_tensor(state_dict, item, job) for item in plan["tensors"]}
    header = {
        "format": "pt",
        "source": job.source.name,
        "source_sha256": loaded["sha256"],
        "converter": CONVERTER,
    }
    header_sha256 = write_safetensors(tensors, header, plan, job.model)
    del tensors, state_dict
    size = job.model.stat().st_size
    logger.info(f"wrote {job.model} ({len(plan['tensors'])} tensors, {size / MIB:.1f} MiB)")
    write_json(job.provenance, provenance(job, loaded))
    write_json(
        job.saved_json,
        {"model": str(job.model), "size": size, "header_sha256": header_sha256},
        indent=1,
    )


def source_tensors(job: Job, loaded: dict) -> dict:
    """The kept tensors, mapped from the file where load recorded them.

    Falls back to unpickling again when load could not locate them (a legacy file).
    """
    if not unchanged(job.source, loaded["size"], loaded["mtime_ns"], loaded["sha256"]):
        raise ConversionError(f"{job.source}: changed since the load stage read it; run again")
    kept = {entry["key"]: entry for entry in loaded["kept"]}
    if all("offset" in entry for entry in kept.values()):
        return map_tensors(job.source, kept)
    checkpoint = open_checkpoint(job.source, trusted=job.trusted, quiet=True)
    return navigate(checkpoint.content, loaded["state_dict_at"])


def _planned_tensor(state_dict, item: dict, job: Job):
    key = item["key"]
    tensor = state_dict.get(key)
    if tensor is None or list(tensor.shape) != item["source_shape"]:
        raise ConversionError(
            f"{job.source}: {key!r} is not what the load stage recorded; "
            "the file changed during the run; run again"
        )
    if item["row"] is not None:
        tensor = tensor[item["row"]]
    return tensor.reshape(item["shape"]).contiguous()


def write_safetensors(tensors: dict, header: dict[str, str], plan: dict, target: Path) -> str:
    """Write, fix the metadata order and check the file before it takes target's place.

    Returns the sha256 of the final header.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(target) as temp:
        try:
            save_file(tensors, temp, metadata=header)
        except SafetensorError as error:  # how safetensors reports a failed write
            raise output_error(error, target.parent) from error
        final_header = sort_metadata(temp)
        verify(temp, plan)
    return hashlib.sha256(final_header).hexdigest()


def sort_metadata(path: Path) -> bytes:
    """Put the header's metadata keys in sorted order, in place; the final header.

    NOTE: safetensors serializes the metadata from a hash map, so its key order (and
    with it the file's bytes) changes from one process to the next. The sorted object
    has the same length, so it is written over the original span.
    """
    with path.open("r+b") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = file.read(length)
        metadata = json.loads(header).get("__metadata__")
        if not metadata:
            return header
        start = header.index(b'"__metadata__":') + len(b'"__metadata__":')
        ordered = json.dumps(
            dict(sorted(metadata.items())), separators=(",", ":"), ensure_ascii=False
        ).encode()
        span = header[start : start + len(ordered)]
        try:
            same = json.loads(span) == metadata
        except ValueError:
            same = False
        if not same:
            raise ConversionError(
                f"{path}: the safetensors header is not laid out as "
                "expected; cannot put its metadata in a fixed order"
            )
        file.seek(8 + start)
        file.write(ordered)
    return header[:start] + ordered + header[start + len(ordered) :]


def check_output_folder(folder: Path, source_name: str) -> None:
    """Refuse a folder holding model*.safetensors that this pipeline did not write.

    llama.cpp's converter reads every model*.safetensors it finds, so a stray one
    would end up in the GGUF. Replacing another checkpoint's conversion only warns.
    """
    if not folder.is_dir():
        return
    sources = {path.name: converted_from(path) for path in folder.glob("model*.safetensors")}
    foreign = sorted(
        name for name, source in sources.items() if name != "model.safetensors" or source is None
    )
    if foreign:
        raise OutputError(
            f"{folder} already holds {', '.join(foreign)}, which this pipeline did not "
            "write; llama.cpp's converter would read them too. Move them away or set "
            "another output for this checkpoint"
        )
    replaced = sources.get("model.safetensors")
    if replaced not in (None, source_name):
        logger.warning(
            f"replacing the conversion of {replaced} in {folder}; give each "
            "checkpoint its own output folder to keep both"
        )


def converted_from(path: Path) -> str | None:
    """The source file name a model.safetensors of ours records; None if not ours."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as file:
            header = file.metadata() or {}
    except Exception:  # missing or unreadable: not a finished file of ours
        return None
    if not header.get("converter", "").startswith("wavtokenizer-pipeline "):
        return None
    return header.get("source", "")


def verify(path: Path, plan: dict) -> None:
    """Read the written header back and compare every name, shape and dtype."""
    from safetensors import safe_open

    expected = {item["name"]: (tuple(item["shape"]), item["dtype"]) for item in plan["tensors"]}
    with safe_open(path, framework="pt") as file:
        found = {}
        for name in file.keys():
            view = file.get_slice(name)
            found[name] = (tuple(view.get_shape()), _dtype_name(view.get_dtype()))
    if found != expected:
        wrong = sorted(set(found.items()) ^ set(expected.items()), key=str)
        raise ConversionError(f"{path}: written tensors differ from the plan: {wrong[:3]}")


SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _dtype_name(code: str) -> str:
    return SAFETENSORS_DTYPES.get(code, code)


def provenance(job: Job, loaded: dict) -> dict:
    return {
        "source": {
            "path": str(job.source),
            "size": loaded["size"],
            "sha256": loaded["sha256"],
            "format": loaded["format"],
            "state_dict_at": loaded["state_dict_at"],
        },
        "entry": job.settings,
        "converter": CONVERTER,
        "versions": {
            "python": platform.python_version(),
            **{name: _version(name) for name in ("torch", "safetensors", "doit")},
        },
        "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"
