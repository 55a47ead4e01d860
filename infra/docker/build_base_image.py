"""Build ``linchkit/python-base`` offline (run through ``build-base-image.sh``).

What goes in, and why it stays small (~45 MB):

* Debian's own ``python3.11`` from this machine: the files ``dpkg -L`` lists for
  python3.11-minimal, libpython3.11-minimal and libpython3.11-stdlib, without the test
  suite, tkinter, idlelib and other modules a plugin server never imports, plus the
  ``__pycache__`` Debian compiled at install time (the root filesystem of a plugin
  container is read-only, so nothing could be compiled at run time).
* The shared libraries those binaries and extension modules link, found with ``ldd``.
* The plugin SDK (``linchkit_plugin``, from ``sdk/python`` of this checkout) and exactly
  the third-party distributions it imports when serving (uvicorn, orjson, …), never the
  host's (``dispatcher``, ``providers``, aiohttp, pydantic),
  copied from the virtualenv's site-packages into ``/opt/linchkit/site`` and compiled
  there by the image's own interpreter. Their compiled wheels are cp311 manylinux
  builds, which Debian's CPython 3.11 loads as well.

The image runs ``python3 -m linchkit_plugin.cli serve`` as uid 65534 (nobody); a plugin
image adds its code under ``/plugin`` and names its class in ``CMD``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("LINCHKIT_BASE_IMAGE", "linchkit/python-base")
INTERPRETER = Path("/usr/bin/python3.11")
DEBIAN_PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib")
STDLIB = Path("/usr/lib/python3.11")
SITE = "/opt/linchkit/site"

# Parts of the standard library a plugin server does not need: tests, GUIs, build tools.
SKIPPED_STDLIB = {
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
    "distutils", "venv", "sqlite3", "curses", "dbm", "config-3.11-x86_64-linux-gnu",
}  # fmt: skip
SKIPPED_EXTENSIONS = (
    "_test", "_xxtest", "xxlimited", "_ctypes_test", "_curses", "readline", "_dbm",
    "_sqlite3", "nis", "ossaudiodev", "audioop",
)  # fmt: skip

# What ``dispatcher-plugin serve`` imports; the distributions behind them are copied.
SDK_IMPORTS = (
    "linchkit_plugin.cli",
    "uvicorn.main",
    "uvicorn.server",
    "uvicorn.loops.auto",
    "uvicorn.loops.uvloop",
    "uvicorn.protocols.http.auto",
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.http.h11_impl",
    "uvicorn.lifespan.on",
)

_FIND_DISTRIBUTIONS = """
import importlib, importlib.metadata as md, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
tops = {name.partition(".")[0] for name in sys.modules}
by_top = md.packages_distributions()
skip = {"linchkit-dispatcher", "linchkit-plugin", "setuptools", "pip", "wheel"}  # setuptools: its .pth hack
dists = sorted({d for top in tops for d in by_top.get(top, ())} - skip)
out = []
for name in dists:
    dist = md.distribution(name)
    files = [str(f.locate()) for f in dist.files or () if not str(f).startswith("..")]
    out.append({"name": name, "version": dist.version, "files": files})
print(json.dumps(out))
"""


def main() -> int:
    distributions = _sdk_distributions()
    digest = _inputs_digest(distributions)
    tag = f"{IMAGE}:{digest}"
    if _image_exists(tag):
        _docker("tag", tag, f"{IMAGE}:latest")
        print(f"{tag} is up to date")
        return 0
    with tempfile.TemporaryDirectory(prefix="linchkit-base-") as scratch:
        site = Path(scratch) / "site"
        _stage_site(site, distributions)
        archive = _root_filesystem(site)
    _docker_import(archive, tag)
    _docker("tag", tag, f"{IMAGE}:latest")
    _smoke_test(tag)
    _remove_older_builds(digest)
    print(f"built {tag} ({len(archive) / 1e6:.1f} MB uncompressed) and tagged {IMAGE}:latest")
    return 0


# -- inputs --------------------------------------------------------------------------


def _sdk_distributions() -> list[dict[str, object]]:
    found = subprocess.run(
        [sys.executable, "-c", _FIND_DISTRIBUTIONS, *SDK_IMPORTS],
        check=True,
        capture_output=True,
        text=True,
    )
    distributions: list[dict[str, object]] = json.loads(found.stdout)
    return distributions


SDK_PACKAGE = ROOT / "sdk" / "python" / "linchkit_plugin"


def _project_sources() -> list[Path]:
    return sorted(
        path
        for path in SDK_PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )


def _inputs_digest(distributions: list[dict[str, object]]) -> str:
    digest = hashlib.sha256()
    versions = subprocess.run(
        ["dpkg-query", "-W", *DEBIAN_PACKAGES], check=True, capture_output=True, text=True
    ).stdout
    digest.update(versions.encode())
    for dist in distributions:
        digest.update(f"{dist['name']}=={dist['version']}\n".encode())
    for path in [*_project_sources(), Path(__file__)]:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# -- the root filesystem -------------------------------------------------------------


def _stage_site(site: Path, distributions: list[dict[str, object]]) -> None:
    site.mkdir(parents=True)
    shutil.copytree(
        SDK_PACKAGE, site / SDK_PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__")
    )
    for file in _files_of(distributions):
        if "__pycache__" in file.parts or not file.is_file():
            continue
        site_packages = next(p for p in file.parents if p.name == "site-packages")
        target = site / file.relative_to(site_packages)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target)
    # Wheels ship their extension modules with symbols (uvloop: 13 MB, 3 MB stripped).
    if shutil.which("strip"):
        extensions = [str(path) for path in site.rglob("*.so")]
        subprocess.run(["strip", "--strip-unneeded", *extensions], check=True)
    # Compiled by the image's own interpreter; hash-checked so file times do not matter.
    subprocess.run(
        [str(INTERPRETER), "-m", "compileall", "-q", "-j", "0",
         "--invalidation-mode", "unchecked-hash", "-d", SITE, str(site)],
        check=True,
    )  # fmt: skip


def _files_of(distributions: list[dict[str, object]]) -> Iterable[Path]:
    for dist in distributions:
        files = dist["files"]
        assert isinstance(files, list)
        yield from (Path(file) for file in files)


def _debian_files() -> list[Path]:
    listed = subprocess.run(
        ["dpkg", "-L", *DEBIAN_PACKAGES], check=True, capture_output=True, text=True
    ).stdout.split()
    files: list[Path] = []
    for line in listed:
        path = Path(line)
        if path.is_dir() and not path.is_symlink():
            continue
        if not path.is_relative_to("/usr/lib") and not path.is_relative_to("/usr/bin"):
            continue  # docs, man pages, /etc/python3.11 sitecustomize
        if path.is_relative_to(STDLIB):
            parts = path.relative_to(STDLIB).parts
            if parts[0] in SKIPPED_STDLIB:
                continue
            if parts[0] == "lib-dynload" and parts[-1].startswith(SKIPPED_EXTENSIONS):
                continue
        files.append(path)
    for cache in STDLIB.rglob("__pycache__"):
        parts = cache.relative_to(STDLIB).parts
        if parts[0] not in SKIPPED_STDLIB:
            files.extend(sorted(cache.glob("*.cpython-311.pyc")))
    files.append(Path("/usr/bin/python3"))
    return files


def _linked_libraries(binaries: Iterable[Path]) -> set[Path]:
    libraries: set[Path] = set()
    for binary in binaries:
        result = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
        for line in result.stdout.splitlines():
            words = line.split()
            if "=>" in words and len(words) > words.index("=>") + 1:
                candidate = words[words.index("=>") + 1]
            elif words and words[0].startswith("/"):
                candidate = words[0]
            else:
                continue
            if candidate.startswith("/"):
                libraries.add(Path(candidate))
    return libraries


class _Tree:
    """The image's files as a tar, every entry owned by root, symlinks kept as symlinks."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buffer, mode="w")  # noqa: SIM115  # closed in close()
        self.added: set[str] = set()

    def directory(self, name: str, mode: int = 0o755) -> None:
        if name in self.added:
            return
        info = tarfile.TarInfo(name.lstrip("/"))
        info.type, info.mode = tarfile.DIRTYPE, mode
        self.tar.addfile(info)
        self.added.add(name)

    def text(self, name: str, content: str) -> None:
        data = content.encode()
        info = tarfile.TarInfo(name.lstrip("/"))
        info.size, info.mode = len(data), 0o644
        self.tar.addfile(info, io.BytesIO(data))
        self.added.add(name)

    def host_path(self, path: Path, arcname: str | None = None) -> None:
        """Add ``path`` as the host has it, following symlinks along the way."""
        name = arcname or str(path)
        if name in self.added:
            return
        self._parents(name, path if arcname is None else None)
        info = self.tar.gettarinfo(str(path), arcname=name.lstrip("/"))
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        if path.is_symlink():
            self.tar.addfile(info)
            self.added.add(name)
            target = Path(os.readlink(path))
            self.host_path(target if target.is_absolute() else path.parent / target)
            return
        if stat.S_ISREG(info.mode):
            with path.open("rb") as content:
                self.tar.addfile(info, content)
        else:
            self.tar.addfile(info)
        self.added.add(name)

    def _parents(self, name: str, host: Path | None) -> None:
        for parent in reversed(Path(name).parents):
            text = str(parent)
            if text == "/" or text in self.added:
                continue
            if host is not None and Path(text).is_symlink():
                self.host_path(Path(text))  # /lib -> usr/lib on merged-/usr Debian
            else:
                self.directory(text)

    def close(self) -> bytes:
        self.tar.close()
        return self.buffer.getvalue()


def _root_filesystem(site: Path) -> bytes:
    tree = _Tree()
    for link in ("/bin", "/lib", "/lib64", "/sbin"):
        if Path(link).is_symlink():
            tree.host_path(Path(link))
    debian = _debian_files()
    elves = [INTERPRETER, *(p for p in debian if p.suffix == ".so" and "lib-dynload" in p.parts)]
    elves += list(site.rglob("*.so"))
    for path in debian:
        tree.host_path(path)
    for library in sorted(_linked_libraries(elves)):
        tree.host_path(library)
    for path in sorted(site.rglob("*")):
        arcname = f"{SITE}/{path.relative_to(site)}"
        if path.is_dir():
            tree.directory(arcname)
        else:
            tree.host_path(path, arcname)
    tree.text("/etc/passwd", "root:x:0:0:root:/root:/usr/sbin/nologin\n"
                             "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")  # fmt: skip
    tree.text("/etc/group", "root:x:0:\nnogroup:x:65534:\n")
    for name, mode in (("/tmp", 0o1777), ("/var/tmp", 0o1777), ("/plugin", 0o755),
                       ("/run/linchkit", 0o755), ("/proc", 0o555), ("/sys", 0o555),
                       ("/dev", 0o755), ("/root", 0o700)):  # fmt: skip
        tree.directory(name, mode)
    return tree.close()


# -- docker --------------------------------------------------------------------------


def _docker(*args: str, data: bytes | None = None) -> str:
    result = subprocess.run(["docker", *args], input=data, capture_output=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"docker {args[0]} failed: {result.stderr.decode().strip()}")
    return result.stdout.decode()


def _image_exists(tag: str) -> bool:
    found = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, check=False)
    return found.returncode == 0


def _docker_import(archive: bytes, tag: str) -> None:
    changes = [
        "ENV PATH=/usr/bin:/bin",
        f"ENV PYTHONPATH={SITE}",
        "ENV PYTHONDONTWRITEBYTECODE=1",
        "ENV PYTHONUNBUFFERED=1",
        "ENV LANG=C.UTF-8",
        "ENV HOME=/tmp",
        "USER 65534:65534",
        "WORKDIR /plugin",
        'ENTRYPOINT ["/usr/bin/python3", "-m", "linchkit_plugin.cli", "serve"]',
        "LABEL org.linchkit.base-image=python",
    ]
    args = ["import"]
    for change in changes:
        args += ["--change", change]
    _docker(*args, "-", tag, data=archive)


def _remove_older_builds(current: str) -> None:
    tags = _docker("images", IMAGE, "--format", "{{.Tag}}").split()
    for tag in tags:
        if tag not in (current, "latest"):
            # Fails, harmlessly, while a plugin image still builds on that base.
            subprocess.run(["docker", "rmi", f"{IMAGE}:{tag}"], capture_output=True, check=False)


def _smoke_test(tag: str) -> None:
    imports = ", ".join(SDK_IMPORTS)
    _docker(
        "run", "--rm", "--network", "none", "--read-only", "--entrypoint", str(INTERPRETER),
        tag, "-c", f"import {imports}",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
