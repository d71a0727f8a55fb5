"""Read the checkpoint lists in configs/*.toml and resolve every entry.

A config file holds an optional `[defaults]` table and `[[checkpoint]]` entries. Every
mistake is found here, before any task runs, and named with its file and entry.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.synthetic import RELEASES

ENTRY_KEYS = {"source", "name", "output", "output_root", "bandwidth_id", "trusted", "sample"}
DEFAULT_KEYS = ENTRY_KEYS - {"source", "name", "output"}
TOP_LEVEL_KEYS = {"defaults", "checkpoint"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
GLOB_CHARS = re.compile(r"[*?\[]")
KINDS = {str: "a string", int: "a whole number", bool: "true or false"}


@dataclass(frozen=True)
class Entry:
    """One checkpoint to convert, with every setting resolved to its final value."""

    name: str
    source: Path
    output: Path
    bandwidth_id: int = 0
    trusted: bool = False
    sample: str | None = None
    origin: str = ""

    def settings(self) -> dict[str, Any]:
        """The entry as plain JSON values, for change detection and provenance."""
        values = asdict(self)
        return {
            key: str(value) if isinstance(value, Path) else value
            for key, value in values.items()
            if key != "origin"
        }


def read_configs(folder: Path, project_root: Path) -> list[Entry]:
    """Every entry of every *.toml file in folder, in file order; raises ConfigError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(
            f"configs folder {str(folder)!r} does not exist; create it or pass configs=DIR"
        )
    files = sorted(path for path in folder.glob("*.toml") if path.is_file())
    if not files:
        raise ConfigError(
            f"configs folder {str(folder)!r} holds no *.toml file; add one "
            "listing your checkpoints (see README.md)"
        )
    entries: list[Entry] = []
    for path in files:
        entries += read_config(path, project_root)
    _check_unique(entries)
    return entries


def read_config(path: Path, project_root: Path) -> list[Entry]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    _check_keys(document, TOP_LEVEL_KEYS, f"{path}")
    defaults = document.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: [defaults] must be a table")
    _check_keys(defaults, DEFAULT_KEYS, f"{path}: [defaults]")
    checkpoints = document.get("checkpoint", [])
    if not isinstance(checkpoints, list):
        raise ConfigError(f"{path}: checkpoints are listed as [[checkpoint]] tables")
    entries = []
    for number, raw in enumerate(checkpoints, start=1):
        where = f"{path}: [[checkpoint]] #{number}"
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{where}: is {raw!r}; each checkpoint is a [[checkpoint]] table with "
                'source = "..."'
            )
        if "source" in raw:
            where += f" (source {raw['source']!r})"
        _check_keys(raw, ENTRY_KEYS, where)
        entries += _resolve(path, {**defaults, **raw}, where, project_root)
    return entries


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}: unknown key {key!r}{hint} (allowed: {', '.join(sorted(allowed))})"
            )


def _resolve(path: Path, values: dict[str, Any], where: str, project_root: Path) -> list[Entry]:
    base = path.parent
    source = _typed(values, "source", str, where, required=True)
    name = _typed(values, "name", str, where)
    output = _typed(values, "output", str, where)
    output_root = _typed(values, "output_root", str, where)
    bandwidth_id = _typed(values, "bandwidth_id", int, where, default=0)
    trusted = _typed(values, "trusted", bool, where, default=False)
    sample = _typed(values, "sample", str, where)
    if bandwidth_id < 0:
        raise ConfigError(f"{where}: bandwidth_id must be 0 or more, got {bandwidth_id}")
    if sample is not None and sample not in RELEASES:
        raise ConfigError(
            f"{where}: sample {sample!r} is not a known release (one of {', '.join(RELEASES)})"
        )
    if name is not None and not NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: name {name!r} may hold only letters, digits, '.', "
            "'_' and '-', so that it can be selected on the command line"
        )
    sources = _sources(base / Path(source).expanduser(), sample, where)
    if len(sources) > 1 and (name is not None or output is not None):
        raise ConfigError(
            f"{where}: a glob matching {len(sources)} files cannot take one "
            "name or output; drop them or list the files one by one"
        )
    root = _path(base, output_root) if output_root else project_root / "converted"
    entries = []
    for found in sources:
        entry_name = name or task_name(found)
        entries.append(
            Entry(
                name=entry_name,
                source=found,
                output=_path(base, output) if output else root / entry_name,
                bandwidth_id=bandwidth_id,
                trusted=trusted,
                sample=sample,
                origin=where,
            )
        )
    return entries


def _typed(
    values: dict, key: str, kind: type, where: str, *, required: bool = False, default: Any = None
) -> Any:
    if key not in values:
        if required:
            raise ConfigError(f"{where}: missing required key {key!r}")
        return default
    value = values[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} must be {KINDS[kind]}, got {value!r}")
    return value


def _sources(pattern: Path, sample: str | None, where: str) -> list[Path]:
    text = str(pattern)
    if GLOB_CHARS.search(text) and not pattern.exists():
        if sample is not None:
            raise ConfigError(
                f"{where}: a sample is generated at one path; its source cannot be a glob"
            )
        found = sorted(_absolute(Path(match)) for match in glob.glob(text, recursive=True))
        files = [match for match in found if match.is_file()]
        if not files:
            raise ConfigError(f"{where}: glob {text!r} matches no file")
        return files
    path = _absolute(pattern)
    if sample is None and not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"{where}: source {str(path)!r} {what}")
    return [path]


def _path(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return _absolute(path if path.is_absolute() else base / path)


def _absolute(path: Path) -> Path:
    """Absolute and without `..`, but with symlinks kept: their names are the names."""
    return Path(os.path.normpath(path.absolute()))


def task_name(source: Path) -> str:
    """A name for a checkpoint file that doit accepts on its command line.

    doit reads any argument holding '=' as a variable, so Lightning's
    `epoch=14-step=3000.ckpt` becomes `epoch_14-step_3000`.
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", source.stem).strip("._-")
    return name or "checkpoint"


def _check_unique(entries: list[Entry]) -> None:
    for attribute in ("name", "output"):
        seen: dict[Any, Entry] = {}
        for entry in entries:
            value = getattr(entry, attribute)
            if value in seen:
                first = seen[value]
                if first.origin == entry.origin:
                    advice = (
                        "the glob finds two files of that name; list them as separate "
                        "[[checkpoint]] entries, each with its own name"
                    )
                else:
                    advice = f"give one of them its own {attribute}"
                raise ConfigError(
                    f"two checkpoints share the {attribute} {str(value)!r}: "
                    f"{first.source} from {first.origin} and {entry.source} from "
                    f"{entry.origin}; {advice}"
                )
            seen[value] = entry


def check_command_line(argv: list[str]) -> None:
    """Catch a task selected by its file's name, which doit would read as a variable.

    `doit write_config:epoch=14-step=3000` would set a variable and run everything.
    """
    for arg in argv:
        name, equals, _ = arg.partition("=")
        if equals and ":" in name and not arg.startswith("-"):
            stage, _, rest = arg.partition(":")
            raise ConfigError(
                f"{arg!r} is read by doit as a variable because of its '='; task names "
                f"replace '=' with '_': use {stage}:{task_name(Path(rest + '.ckpt'))} "
                "(see doit list --all)"
            )
