"""Which files of a plugin's folder go into its Lambda zip: ``.dispatcherignore``.

The plugin's folder (``deploy.path``) is packaged whole, except what these rules leave
out: first ``DEFAULT_IGNORE`` (caches, bytecode, version control, virtualenvs, tests,
logs, build output, ``.env`` files), then the lines of ``.dispatcherignore`` at the top of
the folder, if there is one. The syntax is ``.gitignore``'s (pathspec's ``GitIgnoreSpec``):
``#`` comments, ``*``/``**`` globs, a trailing ``/`` for folders only, a leading ``/`` to
anchor at the folder, and ``!`` to take a pattern back, the last matching line winning,
so ``!tests/`` ships the tests after all. As in git, a file inside an ignored folder
cannot be taken back by itself: take the folder back first.

What is ignored never reaches the zip, so it cannot change ``CodeSha256``: a log file
growing next to the code, or a fresh ``__pycache__``, does not make the next deploy
publish a version. Ignored folders are not even walked (a ``.venv`` costs nothing).

A symbolic link is followed only while it stays inside the folder (a link back up the
tree is skipped); one that leads out
(``config.json -> ~/.aws/credentials``) stops the package with a ``ProviderError``
rather than shipping whatever it points at.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from linchkit_plugin.errors import ProviderError
from providers._log_lines import printable

__all__ = ["DEFAULT_IGNORE", "IGNORE_FILE", "IgnoreRules", "plugin_folder_files"]

IGNORE_FILE = ".dispatcherignore"

#: Left out of every plugin's zip unless ``.dispatcherignore`` takes a line back with ``!``.
DEFAULT_IGNORE = (
    # packaging configuration, not code
    IGNORE_FILE,
    # bytecode and tool caches: rebuilt anywhere, different on every machine
    "__pycache__/",
    "*.py[cod]",
    ".pytest_cache/",
    ".mypy_cache/",
    ".ruff_cache/",
    ".hypothesis/",
    ".tox/",
    ".nox/",
    # version control and virtual environments
    ".git/",
    ".hg/",
    ".svn/",
    ".venv/",
    "venv/",
    # tests run here, not in the function
    "tests/",
    "conftest.py",
    # what running and building leave behind (`deploy --package-only` writes to build/)
    "*.log",
    "build/",
    "dist/",
    "*.egg-info/",
    # local secrets and editor litter
    ".env",
    ".env.*",
    ".DS_Store",
    "*.swp",
    "*~",
)


class IgnoreRules:
    """``DEFAULT_IGNORE`` then a folder's ``.dispatcherignore``, in gitignore syntax."""

    def __init__(self, lines: list[str], *, source: str = "defaults") -> None:
        try:
            import pathspec
        except ImportError:  # pragma: no cover - depends on the installed extras
            raise ProviderError(
                "packaging a Lambda plugin needs pathspec: pip install 'linchkit-dispatcher[lambda]'"
            ) from None
        self.lines = lines
        self.source = source
        try:
            self._spec: Any = pathspec.GitIgnoreSpec.from_lines(lines)
        except (ValueError, TypeError) as error:
            raise ProviderError(f"{source}: not a valid ignore pattern: {error}") from error

    @classmethod
    def for_folder(cls, folder: Path) -> IgnoreRules:
        """The defaults, then ``folder/.dispatcherignore`` if it exists."""
        lines = list(DEFAULT_IGNORE)
        own = folder / IGNORE_FILE
        if own.is_file():
            lines += _ignore_file_lines(own)
            return cls(lines, source=str(own))
        return cls(lines)

    def __repr__(self) -> str:
        return f"<IgnoreRules {self.source}: {len(self.lines)} lines>"

    def ignores(self, relative: str, *, folder: bool = False) -> bool:
        """Whether the POSIX path ``relative`` (to the plugin folder) stays out of the zip."""
        return bool(self._spec.match_file(relative + "/" if folder else relative))


def _ignore_file_lines(path: Path) -> list[str]:
    """The lines of ``.dispatcherignore``. A UTF-8 byte-order mark (some editors write one)
    is dropped: kept, it made the first pattern match nothing and its file was shipped."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise ProviderError(
            f"{_shown(path)} is not UTF-8 text ({error.reason} at byte {error.start}); "
            "save it as UTF-8"
        ) from error
    except OSError as error:
        raise ProviderError(f"cannot read {_shown(path)}: {error.strerror or error}") from error


def _shown(path: Path) -> str:
    return printable(str(path))


def _walk_error(error: OSError) -> None:
    """os.walk's own choice was to skip a folder it cannot list: its files would silently
    be missing from the function."""
    raise ProviderError(
        f"cannot read {_shown(Path(error.filename or '?'))}: {error.strerror or error}"
    ) from error


def plugin_folder_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """``(POSIX path relative to folder, path)`` of every file the rules keep, sorted."""
    rules = IgnoreRules.for_folder(folder)
    root = folder.resolve()
    found: list[tuple[str, Path]] = []
    for directory, folders, files in os.walk(folder, onerror=_walk_error, followlinks=True):
        here = Path(directory)
        ancestors = {here.resolve(), *here.resolve().parents}
        kept_folders = []
        for name in folders:
            path = here / name
            relative = path.relative_to(folder).as_posix()
            if rules.ignores(relative, folder=True):
                continue
            if _inside(root, path, relative) in ancestors:
                continue  # a link back up the tree: walking it would never end
            kept_folders.append(name)
        folders[:] = sorted(kept_folders)
        for name in files:
            path = here / name
            relative = path.relative_to(folder).as_posix()
            if rules.ignores(relative):
                continue
            _inside(root, path, relative)
            if path.is_file():
                found.append((relative, path))
    yield from sorted(found)


def _inside(root: Path, path: Path, relative: str) -> Path:
    """Where ``path`` really is; a ``ProviderError`` if a link takes it out of ``root``."""
    try:
        target = path.resolve()
    except (RuntimeError, OSError) as error:  # RuntimeError: a loop of links (a -> b -> a)
        raise ProviderError(
            f"cannot read {printable(relative)} in the plugin folder {_shown(root)}: {error}"
        ) from error
    if target != root and root not in target.parents:
        raise ProviderError(
            f"{relative} in the plugin folder {root} is a link to {target}, outside the "
            f"folder; copy what it needs into the folder, or list it in {IGNORE_FILE}"
        )
    return target
