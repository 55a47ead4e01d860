"""Where a local plugin's module comes from: its target's folder, at start and at reloads.

Python keeps one module per name in a process (``sys.modules``) and ``import`` answers
with it whatever folder a target names: a reload pointing a local target at a new folder
holding a module of the same name (a new version shipped in a new folder) ran the old
folder's code and reported success. So, before a local plugin is loaded, the top-level
module of its entrypoint (``pkg`` of ``pkg.mod:Class``), as its target's ``path`` finds it
(``LocalTarget.host_module``):

- not imported yet: is imported from that folder itself, not from whichever folder comes
  first on ``sys.path`` (a rollback names a folder already there, behind the newer one);
- imported from that same file: is kept. A reload that keeps the path keeps the module:
  code edited in place is loaded by a restart, or from a new folder;
- imported from another place by a local plugin: is put aside with its submodules
  (``pkg.*``) and imported from the target's folder in its place. Plugin instances still
  attached keep the classes and functions they were made from until they are detached
  (a reload attaches the new before it detaches the old); only what they import while
  running (an ``import`` inside a method) is the new module from then on;
- imported from another place by the host application itself (there before any local
  plugin asked for the name): is not replaced, as the application would be left on one
  version and the plugin on another. ``ModuleConflict`` names the module and both places.

Which names local plugins brought in is kept for the whole process, as ``sys.modules``
is: every dispatcher of the process imports into the same one. Modules of other names a
plugin's module imports (a sibling ``helpers.py`` beside ``echo.py``) are not moved: a
plugin made of several modules ships them as one package.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from importlib.machinery import PathFinder
from pathlib import Path
from types import ModuleType

from linchkit_plugin.errors import ProviderError

__all__ = ["ModuleConflict", "PutAside", "import_from_folder"]

#: The top-level module each name's latest import by a local plugin brought into the
#: process: the names local plugins may replace (another dispatcher's included).
_IMPORTED_BY_PLUGINS: dict[str, ModuleType] = {}


class ModuleConflict(ProviderError):
    """A local target's module is imported from another place by the host application:
    replacing it would split the application and the plugin over two versions."""

    def __init__(self, module: str, loaded_from: str, wanted_from: str) -> None:
        super().__init__(
            f"cannot import module {module!r} from {wanted_from}: the host application has"
            f" imported it from {loaded_from} itself, and a process holds one module of a"
            " name, so the plugin would run that code. Give the plugin's module another"
            " name, or run it out of process (provider: subprocess)",
            details={"module": module, "loaded_from": loaded_from, "wanted_from": wanted_from},
        )
        self.module = module
        self.loaded_from = loaded_from
        self.wanted_from = wanted_from


@dataclass(frozen=True, slots=True)
class PutAside:
    """The modules of ``name`` an import took out of ``sys.modules``, for ``put_back``
    when the attach it was made for fails: the running plugins' modules stay in place."""

    name: str
    modules: dict[str, ModuleType]

    def put_back(self) -> None:
        _take_out(self.name)
        sys.modules.update(self.modules)
        previous = self.modules.get(self.name)
        if previous is None:
            _IMPORTED_BY_PLUGINS.pop(self.name, None)
        else:
            _IMPORTED_BY_PLUGINS[self.name] = previous


def import_from_folder(found: tuple[str, str] | None, folder: Path | None) -> PutAside | None:
    """Make ``sys.modules`` hold the module ``found`` (``host_module``: its name and where
    its code is) from ``folder``; what it put aside, or None when it imported nothing.

    Nothing found in the folder is left to the plugin's import (``sys.path``), as always.
    Raises ``ModuleConflict`` (nothing changed) or ``ProviderError`` (its import failed;
    what it put aside is back)."""
    if found is None or folder is None:
        return None
    name, where = found
    loaded = sys.modules.get(name)
    if loaded is not None:
        loaded_from = _location(loaded)
        if loaded_from is not None and _same_place(loaded_from, where):
            return None
        if _IMPORTED_BY_PLUGINS.get(name) is not loaded:
            raise ModuleConflict(name, loaded_from or repr(loaded), where)
    put_aside = PutAside(name, _take_out(name))
    try:
        _IMPORTED_BY_PLUGINS[name] = _imported(name, folder)
    except BaseException:
        put_aside.put_back()
        raise
    return put_aside


def _imported(name: str, folder: Path) -> ModuleType:
    """The top-level module ``name`` of ``folder``, executed and in ``sys.modules``: what
    ``import`` does, with the folder named instead of ``sys.path`` searched."""
    spec = PathFinder.find_spec(name, [str(folder)])
    if spec is None or spec.loader is None:
        raise ProviderError(f"cannot import module {name!r}: {folder} no longer holds it")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise ProviderError(f"cannot import module {name!r} from {folder}: {error!r}") from error
    return sys.modules.get(name, module)  # a module may put another object in its place


def _take_out(name: str) -> dict[str, ModuleType]:
    """Take the module ``name`` and its submodules out of ``sys.modules``; return them."""
    prefix = f"{name}."
    # A copy first: a worker thread of a running plugin may import while this looks.
    loaded = list(sys.modules.items())
    taken = {key: module for key, module in loaded if key == name or key.startswith(prefix)}
    for key in taken:
        del sys.modules[key]
    return taken


def _location(module: ModuleType) -> str | None:
    """Where ``module``'s code is, as ``host_module`` says it: its file, or its folder."""
    spec = getattr(module, "__spec__", None)
    if spec is None:
        location: str | None = getattr(module, "__file__", None)
        return location
    return spec.origin or next(iter(spec.submodule_search_locations or ()), None)


def _same_place(one: str, other: str) -> bool:
    # Two spellings of one file (a symlinked folder, ``..``) are one module.
    return one == other or os.path.realpath(one) == os.path.realpath(other)
