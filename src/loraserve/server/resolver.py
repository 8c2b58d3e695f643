"""AdapterResolver: adapter names -> PEFT directories inside one root folder.

With ``--adapter-dir DIR``, a request naming an adapter X that is not loaded loads DIR/X on
first use (vLLM's filesystem resolver, LoRAX's just-in-time loading). The name comes from the
client, so it must never reach outside DIR:

- a name is one path component: no '/', '\\', NUL or other control characters, no
  whitespace, not '.' and no '..' anywhere, not starting with '~';
- the resolved path (symbolic links followed) must lie strictly inside DIR.

A name that breaks these rules is an UnsafeAdapterName (the app answers 400); a safe name
with no directory behind it is an AdapterNotFound (404).
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

MAX_NAME_LEN = 255


class UnsafeAdapterName(ValueError):
    """A name that could point outside the adapter directory."""


class AdapterNotFound(LookupError):
    """A safe name with no adapter directory behind it."""


class AdapterResolver:
    """Resolves names to directories under ``root`` (which must exist)."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--adapter-dir {root}: not a directory")
        self.root = root.resolve()

    def resolve(self, name: str) -> Path:
        """The directory of adapter ``name``. Raises UnsafeAdapterName or AdapterNotFound."""
        check_name(name)
        path = (self.root / name).resolve()
        if path == self.root or not path.is_relative_to(self.root):
            logger.warning("adapter name %r resolves outside %s: refused", name, self.root)
            raise UnsafeAdapterName(
                f"adapter name {name!r} resolves outside the adapter directory: refused"
            )
        if not path.is_dir():
            raise AdapterNotFound(f"adapter {name!r} does not exist in the adapter directory")
        return path


def check_name(name: str) -> None:
    """Raise UnsafeAdapterName unless ``name`` is a single, plain path component."""
    problem = _name_problem(name)
    if problem:
        raise UnsafeAdapterName(f"adapter name {name!r} is not allowed: {problem}")


def _name_problem(name: str) -> str | None:
    if not name:
        return "it is empty"
    if len(name) > MAX_NAME_LEN:
        return f"it is longer than {MAX_NAME_LEN} characters"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if ".." in name or name == ".":
        return "it contains '..' or is '.'"
    if name.startswith("~"):
        return "it starts with '~'"
    if any(not c.isprintable() or c.isspace() for c in name):
        return "it contains a control character or whitespace"
    return None
