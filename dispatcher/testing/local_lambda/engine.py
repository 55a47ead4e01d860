"""A minimal Docker Engine API client over the Unix socket: the calls the local Lambda needs.

``DockerEngine`` creates and starts a container from an Engine API body (``run``), tells
whether it still runs, reads its stdout (its last lines, or its lines since a time with
the engine's times), removes it, checks that an image exists, and finds the containers of
local Lambdas whose owning process died (``orphans``). Containers are recognised by two
labels, set by ``runtime``: ``linchkit.local-lambda`` (the function name) and
``linchkit.owner-pid`` (the process that started it).

Contract: ``start()`` before any call, ``aclose()`` after; a failed create/start raises
``LocalLambdaError``; reads that fail answer "nothing" (``[]``, ``False``) rather than raise,
since their callers only use them to decide or to explain.

A client of its own on aiohttp (a core dependency) rather than aiodocker, which the docker
provider uses (``providers/docker/engine.py``): the Lambda test kit then works with the
``lambda`` extra alone, without the ``docker`` extra, and needs only these few calls.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import orjson

from dispatcher.testing.local_lambda.errors import LocalLambdaError

if TYPE_CHECKING:
    import aiohttp

__all__ = ["DOCKER_API", "DockerEngine"]

DOCKER_API = "v1.41"


class DockerEngine:
    """The few Docker Engine API calls the local Lambda needs, over the Unix socket."""

    def __init__(self, socket_path: str = "/var/run/docker.sock") -> None:
        self.socket_path = socket_path
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        import aiohttp

        if not _exists(self.socket_path):
            raise LocalLambdaError(
                f"no Docker engine at {self.socket_path}; start one (scripts/start-docker.sh)"
            )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self.socket_path),
            base_url="http://docker",
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        session = self._session
        if session is None:
            raise LocalLambdaError("the Docker client is not started")
        async with session.request(
            method, f"/{DOCKER_API}{path}", json=json, params=params
        ) as response:
            return response.status, await response.read()

    async def image_exists(self, image: str) -> bool:
        status, _ = await self.request("GET", f"/images/{image}/json")
        return status == 200

    async def run(self, body: dict[str, Any]) -> str:
        status, answer = await self.request("POST", "/containers/create", json=body)
        if status != 201:
            raise LocalLambdaError(f"docker create failed ({status}): {answer[:300]!r}")
        container = str(orjson.loads(answer)["Id"])
        status, answer = await self.request("POST", f"/containers/{container}/start")
        if status not in (204, 304):
            await self.remove(container)
            raise LocalLambdaError(f"docker start failed ({status}): {answer[:300]!r}")
        return container

    async def running(self, container: str) -> bool:
        status, answer = await self.request("GET", f"/containers/{container}/json")
        return status == 200 and bool(orjson.loads(answer)["State"]["Running"])

    async def orphans(self) -> list[str]:
        """Containers of local Lambdas whose owning process is gone (killed, crashed)."""
        filters = orjson.dumps({"label": ["linchkit.local-lambda"]}).decode()
        status, answer = await self.request(
            "GET", "/containers/json", params={"all": "1", "filters": filters}
        )
        if status != 200:
            return []
        found = []
        for container in orjson.loads(answer):
            owner = container.get("Labels", {}).get("linchkit.owner-pid", "")
            if owner.isdigit() and not _alive(int(owner)):
                found.append(str(container["Id"]))
        return found

    async def remove(self, container: str) -> None:
        await self.request("DELETE", f"/containers/{container}", params={"force": "1", "v": "1"})

    async def logs(self, container: str, *, tail: int = 400) -> list[str]:
        """The container's stdout, as lines (the engine's multiplexed stream, demuxed)."""
        status, raw = await self.request(
            "GET",
            f"/containers/{container}/logs",
            params={"stdout": "1", "stderr": "0", "tail": str(tail)},
        )
        if status != 200:
            return []
        return b"".join(_frames(raw)).decode("utf-8", "replace").splitlines()

    async def timed_lines(
        self, container: str, *, since: str | None = None
    ) -> list[tuple[str, str]]:
        """The container's stdout lines written at or after ``since`` (``seconds.nanoseconds``),
        each with the engine's time of it (RFC 3339, nanoseconds, UTC).

        The engine keeps a line over 16 KB in parts, each with its own time: they are joined
        here, under the first part's time. A line still missing its end is left out (it is
        read whole next time, since its first part).
        """
        params = {"stdout": "1", "stderr": "0", "tail": "all", "timestamps": "1"}
        if since is not None:
            params["since"] = since
        status, raw = await self.request("GET", f"/containers/{container}/logs", params=params)
        if status != 200:
            return []
        lines: list[tuple[str, str]] = []
        first: bytes | None = None
        parts: list[bytes] = []
        # One frame per message: the time, a space, the text; a part lacks the newline.
        for frame in _frames(raw):
            stamp, _, text = frame.partition(b" ")
            first = stamp if first is None else first
            parts.append(text)
            if text.endswith(b"\n"):
                line = b"".join(parts)[:-1].decode("utf-8", "replace")
                lines.append((first.decode("ascii", "replace"), line))
                first, parts = None, []
        return lines


def _frames(raw: bytes) -> list[bytes]:
    """The payloads of the engine's multiplexed stream.

    Without a TTY the engine frames each message: 8-byte header (stream, 3 pad bytes,
    big-endian length), then the payload.
    """
    frames: list[bytes] = []
    offset = 0
    while offset + 8 <= len(raw):
        size = int.from_bytes(raw[offset + 4 : offset + 8], "big")
        frames.append(raw[offset + 8 : offset + 8 + size])
        offset += 8 + size
    return frames


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The process exists but belongs to someone else: alive, so not our orphan.
        return True
    return True


def _exists(path: str) -> bool:
    return os.path.exists(path)
