"""A fingerprint of the code behind each stage, so that editing it reruns the stage.

doit tracks files and settings, not the Python a task runs. Each stage's tasks carry the
sha256 of its module and of every module of this package that it imports, directly or
not, in `config_changed`; the sources are parsed, not imported, to keep task loading
free of torch.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = "pipeline"
PACKAGE_DIR = Path(__file__).parent


@functools.cache
def fingerprint(module: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(_closure(module)):
        digest.update(name.encode() + b"\0" + _file(name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _closure(module: str) -> set[str]:
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending += _imports(name)
    return seen


@functools.cache
def _imports(module: str) -> tuple[str, ...]:
    tree = ast.parse(_file(module).read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    own = {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}
    return tuple(sorted(name for name in own if _exists(name)))


def _file(module: str) -> Path:
    parts = module.split(".")[1:]
    folder = PACKAGE_DIR.joinpath(*parts)
    return folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")


def _exists(module: str) -> bool:
    return _file(module).is_file()
