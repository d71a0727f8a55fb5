"""Open a training checkpoint without running its code, and find its state dict.

Checkpoints come from many hands, so the loader trusts nothing in them:

- the first bytes are checked before torch is asked, so an empty file, a Git LFS
  pointer, an HTML error page or a truncated download gets an error of its own;
- torch's weights-only unpickler reads the file; classes it refuses (callbacks, paths,
  config containers of training code that is not installed here) get an inert
  placeholder registered under the exact name the file holds, and a warning;
- a pickled call to anything that runs code (exec, os.system, ...) stops the load;
- zip checkpoints are memory-mapped, so only the tensors that are used are ever read.
"""

from __future__ import annotations

import binascii
import bisect
import mmap
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from pipeline.errors import CheckpointError
from pipeline.rules import looks_like_decoder

if TYPE_CHECKING:
    import torch

ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy format opens with a pickled magic number (LONG1, 10 bytes).
LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
LFS_POINTER = b"version https://git-lfs"
SNIFF_BYTES = 512
MAX_DEPTH = 8  # how deep in the checkpoint's dicts and lists the state dict may sit

# Modules and names whose appearance in a pickle means it tries to run code. A
# placeholder would keep them inert too, but such a file is refused outright.
# fmt: off
CODE_RUNNING_MODULES = {
    "os", "posix", "nt", "sys", "subprocess", "commands", "importlib", "runpy", "shutil",
    "pty", "socket", "ctypes", "marshal", "pickle", "_pickle", "code", "codeop",
    "functools", "operator", "webbrowser", "multiprocessing", "threading", "signal",
    "asyncio", "pdb", "timeit", "tempfile", "io", "_io", "urllib", "http", "requests",
    "dill", "cloudpickle", "torch.hub", "torch.jit", "torch.ops", "torch._C",
    "torch.utils.cpp_extension",
}
CODE_RUNNING_BUILTINS = {
    "eval", "exec", "compile", "__import__", "open", "getattr", "setattr", "delattr",
    "globals", "locals", "vars", "breakpoint", "input", "help", "exit", "quit",
    "__build_class__", "super", "memoryview",
}
CODE_RUNNING_NAMES = {
    "torch.load", "torch.save", "numpy.load", "numpy.save", "types.FunctionType",
    "types.CodeType", "types.LambdaType", "types.MethodType", "types.ModuleType",
    "types.new_class", "types.prepare_class",
}
# fmt: on


@dataclass
class Loaded:
    """A checkpoint opened for reading: the unpickled object and how it was read."""

    path: Path
    content: Any
    format: str  # "zip" or "legacy"
    placeholders: list[str] = field(default_factory=list)
    trusted: bool = False


def sniff(path: Path) -> str:
    """ "zip" or "legacy" for a torch.save file; CheckpointError for anything else."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            head = file.read(SNIFF_BYTES)
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: file not found") from error
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read: {error.strerror}") from error
    if size == 0:
        raise CheckpointError(
            f"{path}: the file is empty (0 bytes); the copy or download that made it failed"
        )
    if head.startswith(LFS_POINTER):
        raise CheckpointError(
            f"{path}: is a Git LFS pointer ({size} bytes), not the "
            "checkpoint; fetch the real file with `git lfs pull`"
        )
    if _looks_like_html(head):
        raise CheckpointError(
            f"{path}: is an HTML page, not a checkpoint (a login or "
            "error page saved by a failed download?); download it again"
        )
    if head.startswith(ZIP_MAGIC):
        _check_zip(path, size)
        return "zip"
    if head[:1] == b"\x80" and LEGACY_MAGIC in head[:32]:
        return "legacy"
    if size >= 10 and head[8:10] == b'{"':
        raise CheckpointError(
            f"{path}: is a safetensors file, not a training checkpoint; "
            "it may already be converted"
        )
    if head[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: is a Python pickle but was not written by "
            "torch.save; it is not a PyTorch checkpoint"
        )
    if _looks_like_text(head):
        first = head.decode("utf-8", "replace").strip().splitlines()[0][:60]
        raise CheckpointError(
            f"{path}: is a text file, not a checkpoint (it starts with {first!r})"
        )
    raise CheckpointError(
        f"{path}: is not a PyTorch checkpoint (it starts with bytes {head[:8].hex(' ')})"
    )


def _looks_like_html(head: bytes) -> bool:
    start = head.lstrip().lower()
    return start.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml"))


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(char.isprintable() or char in "\r\n\t" for char in text)


def _check_zip(path: Path, size: int) -> None:
    """Catch truncated and damaged zips before torch's reader sees them."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            pickles = [
                m for m in members if m.filename.endswith("/data.pkl") or m.filename == "data.pkl"
            ]
            if not pickles:
                raise CheckpointError(
                    f"{path}: is a zip archive but not a PyTorch checkpoint (it holds no data.pkl)"
                )
            for member in members:
                end = member.header_offset + member.compress_size
                if member.compress_type != zipfile.ZIP_STORED or end > size:
                    raise CheckpointError(
                        f"{path}: is damaged: zip member "
                        f"{member.filename!r} lies outside the file "
                        "or is compressed; download it again"
                    )
                archive.open(member).close()  # checks its local header against the directory
            archive.read(pickles[0])  # checks the pickle's CRC
    except zipfile.BadZipFile as error:
        raise CheckpointError(
            f"{path}: is truncated or damaged ({error}); the download "
            "or copy probably stopped early; fetch it again"
        ) from error
    except (OSError, EOFError, ValueError, NotImplementedError) as error:
        raise CheckpointError(
            f"{path}: is damaged: its zip structure cannot be read ({error})"
        ) from error


def open_checkpoint(
    path: Path, *, trusted: bool = False, quiet: bool = False, kind: str | None = None
) -> Loaded:
    """Unpickle a checkpoint on the CPU; zip files are memory-mapped, not read.

    `kind` is what sniff() said of the file, when the caller already asked it.
    """
    import torch

    path = Path(path)
    kind = kind or sniff(path)
    log = logger.debug if quiet else logger.info
    if trusted:
        logger.warning(
            f"{path.name}: trusted = true: loading with the full pickle "
            "loader, which runs any code the file holds"
        )
        return Loaded(path, _torch_load(path, kind, weights_only=False), kind, trusted=True)
    unsafe = sorted(_unsafe_globals(path, kind))
    refused = [name for name in unsafe if _runs_code(name)]
    if refused:
        raise CheckpointError(
            f"{path}: refused: its pickle calls {', '.join(refused)}, "
            "which would run code on this machine; the file may be "
            "malicious and was not loaded"
        )
    placeholders = [_placeholder(name) for name in unsafe]
    for name in unsafe:
        (logger.debug if quiet else logger.warning)(
            f"{path.name}: {name} is not allowed by the weights-only loader (or not "
            "installed here); an inert placeholder stands in for it, never imported or "
            "called (the state dict does not need it)"
        )
    if kind == "legacy":
        log(
            f"{path.name}: legacy (pre-zip) serialization: cannot be memory-mapped, "
            "reading the whole file"
        )
    with torch.serialization.safe_globals(placeholders):
        content = _torch_load(path, kind, weights_only=True)
    return Loaded(path, content, kind, unsafe)


def locate(path: Path, tensors: dict[str, "torch.Tensor"]) -> dict[str, dict] | None:
    """Where each tensor's data lies in the memory-mapped file: byte offset and strides.

    Lets a later stage map the file and take just these tensors, without unpickling it
    again (which may happen in another of doit's worker processes). None when the
    tensors are not views of one mapping of the file, as after a legacy load.
    """
    start = _mapping_start(path, [t.untyped_storage().data_ptr() for t in tensors.values()])
    if start is None:
        return None
    return {
        key: {
            "offset": t.untyped_storage().data_ptr()
            - start
            + t.storage_offset() * t.element_size(),
            "stride": list(t.stride()),
        }
        for key, t in tensors.items()
    }


def _mapping_start(path: Path, pointers: list[int]) -> int | None:
    """Start address of this process's mapping of the whole file holding every pointer."""
    stat = path.stat()
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[4] != str(stat.st_ino) or int(fields[2], 16) != 0:
            continue
        start, end = (int(address, 16) for address in fields[0].split("-"))
        if end - start >= stat.st_size and all(
            start <= p < start + stat.st_size for p in pointers
        ):
            return start
    return None


def check_records(path: Path, extents: dict[str, tuple[int, int]]) -> None:
    """Check the CRC-32 of every zip record holding one of the (offset, length) ranges.

    torch reads a memory-mapped record without checking it, so damaged bytes inside a
    kept tensor would otherwise reach the output unnoticed.
    """
    with path.open("rb") as file, zipfile.ZipFile(file) as archive:
        records = []
        for info in archive.infolist():
            file.seek(info.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", file.read(4))
            start = info.header_offset + 30 + name_length + extra_length
            records.append((start, start + info.file_size, info))
        records.sort(key=lambda record: record[0])
        starts = [record[0] for record in records]
        wanted: dict[int, str] = {}
        for key, (offset, length) in extents.items():
            index = bisect.bisect_right(starts, offset) - 1
            if index < 0 or offset + length > records[index][1]:
                raise CheckpointError(f"{path}: is damaged: {key!r} lies outside its record")
            wanted.setdefault(index, key)
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            for index, key in wanted.items():
                start, end, info = records[index]
                if _crc32(mapped, start, end) != info.CRC:
                    raise CheckpointError(
                        f"{path}: is damaged: the bytes of {key!r} fail their CRC check "
                        f"(zip record {info.filename!r}); copy or download it again"
                    )


def _crc32(mapped: mmap.mmap, start: int, end: int) -> int:
    with memoryview(mapped) as view, view[start:end] as chunk:
        return binascii.crc32(chunk)


def map_tensors(path: Path, entries: dict[str, dict]) -> dict[str, "torch.Tensor"]:
    """Views of the file's bytes as tensors, from the locations `locate` recorded."""
    import torch

    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    tensors = {}
    for key, entry in entries.items():
        dtype = getattr(torch, entry["dtype"])
        offset, size = divmod(entry["offset"], dtype.itemsize)
        if size:
            raise CheckpointError(f"{path}: {key!r} is not aligned in the file")
        tensor = torch.empty(0, dtype=dtype)
        tensor.set_(storage, offset, entry["shape"], entry["stride"])
        tensors[key] = tensor
    return tensors


def _torch_load(path: Path, kind: str, *, weights_only: bool) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=kind == "zip")
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: the weights-only loader cannot rebuild an object in it "
            f"({_unpickler_cause(error)}); if the team vouches for this file, set "
            "trusted = true on its config entry"
        ) from error
    except (
        RuntimeError,
        EOFError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        OverflowError,
        MemoryError,
        UnicodeDecodeError,
        OSError,
        ImportError,
        AssertionError,
    ) as error:
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint; it looks truncated "
            f"or damaged ({type(error).__name__}: {_first_line(error)})"
        ) from error


def _unpickler_cause(error: BaseException) -> str:
    """The reason inside torch's long 'Weights only load failed' message."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    cause = text.split(marker, 1)[1] if marker in text else text
    return cause.strip().splitlines()[0][:200] if cause.strip() else type(error).__name__


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def _unsafe_globals(path: Path, kind: str) -> set[str]:
    """Names of the pickle's globals that torch's weights-only unpickler refuses."""
    import torch

    try:
        if kind == "zip":
            return set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        return _legacy_globals(path) - set(_allowed_globals())
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: its pickle uses opcodes torch's weights-only loader does not read "
            f"({_first_line(error)}): saved with another pickle protocol than "
            "torch.save's default? Save it again with the defaults, or set trusted = true"
        ) from error
    except (
        RuntimeError,
        ValueError,
        EOFError,
        KeyError,
        IndexError,
        OSError,
    ) as error:
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint; it looks truncated "
            f"or damaged ({type(error).__name__}: {_first_line(error)})"
        ) from error


def _legacy_globals(path: Path) -> set[str]:
    """Globals in the four pickles a legacy file opens with (the last is the object)."""
    found = set()
    with path.open("rb") as file:
        for _ in range(4):
            for opcode, argument, _ in pickletools.genops(file):
                if opcode.name == "GLOBAL":
                    found.add(str(argument).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL":
                    raise CheckpointError(
                        f"{path}: its pickle uses protocol 4 globals, which torch's "
                        "weights-only loader does not read; save it again with "
                        "torch.save's defaults, or set trusted = true"
                    )
    return found


def _allowed_globals() -> dict[str, Any]:
    # NOTE: torch only exposes its default allowlist through this private helper; the
    # public scan (get_unsafe_globals_in_checkpoint) does not read legacy files.
    from torch import _weights_only_unpickler

    return _weights_only_unpickler._get_allowed_globals()


def _runs_code(name: str) -> bool:
    module, _, attribute = name.rpartition(".")
    if module == "builtins" or module == "__builtin__":
        return attribute in CODE_RUNNING_BUILTINS
    if not module:
        return attribute in CODE_RUNNING_BUILTINS
    parts = module.split(".")
    prefixes = {".".join(parts[:n]) for n in range(1, len(parts) + 1)}
    return bool(prefixes & CODE_RUNNING_MODULES) or name in CODE_RUNNING_NAMES


class Placeholder:
    """Stands in for a class of the checkpoint that is not loaded: keeps its arguments."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Placeholder":
        instance = object.__new__(cls)
        instance.__dict__["placeholder_args"] = args
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["placeholder_state"] = state

    def __repr__(self) -> str:
        return f"<placeholder for {type(self).__module__}.{type(self).__qualname__}>"


def _placeholder(name: str) -> tuple[type, str]:
    module, _, attribute = name.rpartition(".")
    cls = type(attribute, (Placeholder,), {"__module__": module, "__qualname__": attribute})
    return cls, name


def find_state_dict(content: Any, path: Path) -> tuple[list[str], Mapping[str, "torch.Tensor"]]:
    """The mapping that holds the decoder's tensors, and the keys that lead to it.

    It is found by its contents (backbone and head tensors), wherever it sits: the
    Lightning `state_dict`, a bare state dict, or one nested under `model` and the like.
    """
    candidates = []
    for at, mapping in _mappings(content, []):
        hits = sum(
            1
            for key, value in mapping.items()
            if _is_tensor(value) and isinstance(key, str) and looks_like_decoder(key)
        )
        if hits:
            candidates.append((hits, at, mapping))
    if not candidates:
        raise CheckpointError(
            f"{path}: no WavTokenizer state dict found (no backbone.* or head.out.* "
            f"tensors). Top-level keys: {_top_level(content)}; tensor names seen: "
            f"{_sample_tensor_names(content)}"
        )
    candidates.sort(key=lambda item: -item[0])
    if len(candidates) > 1 and candidates[0][0] == candidates[1][0]:
        places = " and ".join(describe(at) for _, at, _ in candidates[:2])
        raise CheckpointError(
            f"{path}: two state dicts hold the decoder equally "
            f"({places}); keep only the one to convert"
        )
    _, at, mapping = candidates[0]
    return at, mapping


def _mappings(node: Any, at: list, depth: int = 0) -> Iterator[tuple[list, Mapping]]:
    """Every mapping in the object, with the keys (or list indices) that lead to it."""
    if depth > MAX_DEPTH:
        return
    if isinstance(node, Mapping):
        yield at, node
        children = [(k, v) for k, v in node.items() if isinstance(k, str)]
    elif isinstance(node, (list, tuple)):
        children = list(enumerate(node))
    else:
        return
    for key, value in children:
        if isinstance(value, (Mapping, list, tuple)):
            yield from _mappings(value, at + [key], depth + 1)


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _top_level(content: Any) -> str:
    if isinstance(content, Mapping):
        return ", ".join(repr(key) for key in list(content)[:12]) or "(none)"
    return f"(not a dict but {type(content).__name__})"


def _sample_tensor_names(content: Any, limit: int = 5) -> str:
    names = []
    for at, mapping in _mappings(content, []):
        names += [
            ".".join(map(str, at + [key])) for key, value in mapping.items() if _is_tensor(value)
        ]
        if len(names) >= limit:
            break
    return ", ".join(names[:limit]) or "(none)"


def describe(at: list) -> str:
    """Where a state dict sits, for messages: `'state_dict'` or `the top level`."""
    return "the top level" if not at else " > ".join(repr(key) for key in at)


def navigate(content: Any, at: list[str]) -> Mapping:
    for key in at:
        content = content[key]
    return content
