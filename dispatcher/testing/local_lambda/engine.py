"""A minimal Docker Engine API client over the Unix socket: the calls the local Lambda needs.

``DockerEngine`` creates and starts a container from an Engine API body (``run``), tells
whether it still runs, reads its stdout (the last lines, or since a time), removes it,
checks that an image exists, and finds the containers of local Lambdas whose owning
process died (``orphans``). Containers are recognised by two labels, set by ``runtime``:
``linchkit.local-lambda`` (the function name) and ``linchkit.owner-pid`` (the process that
started it).

Contract: ``start()`` before any call, ``aclose()`` after; a failed create/start raises
``LocalLambdaError``; reads that fail answer "nothing" (``[]``, ``False``) rather than raise,
since their callers only use them to decide or to explain.

A client of its own on aiohttp (a core dependency) rather than aiodocker, which the docker
provider uses (``providers/docker/engine.py``): the Lambda test kit then works with the
``lambda`` extra alone, without the ``docker`` extra, and needs only these six calls.
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

    async def logs(
        self,
        container: str,
        *,
        tail: int | None = 400,
        since: str | None = None,
        timestamps: bool = False,
    ) -> list[str]:
        """The container's stdout, as lines (the engine's multiplexed stream, demuxed).

        ``tail``: the last lines only (None: all); ``since``: lines written at or after
        that time (``seconds.nanoseconds``); ``timestamps``: each line after its time
        (RFC 3339, nanoseconds, UTC) and a space.
        """
        params = {"stdout": "1", "stderr": "0", "tail": "all" if tail is None else str(tail)}
        if since is not None:
            params["since"] = since
        if timestamps:
            params["timestamps"] = "1"
        status, raw = await self.request("GET", f"/containers/{container}/logs", params=params)
        if status != 200:
            return []
        # Without a TTY the engine frames each chunk: 8-byte header (stream, 3 pad bytes,
        # big-endian length), then the payload.
        chunks: list[bytes] = []
        offset = 0
        while offset + 8 <= len(raw):
            size = int.from_bytes(raw[offset + 4 : offset + 8], "big")
            chunks.append(raw[offset + 8 : offset + 8 + size])
            offset += 8 + size
        return b"".join(chunks).decode("utf-8", "replace").splitlines()


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
