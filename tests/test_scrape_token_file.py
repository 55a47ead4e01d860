"""``telemetry.metrics.token_file``: the scrape token read from a file and read again when
the file changes (a rename, a Kubernetes secret's symlink swap), the previous token still
admitted for a grace, the last good token kept when the file goes bad.

The token's rules in time run on an injected clock (``ScrapeTokenFile``); the rotations a
scraper must not notice run against a real admin port, scraped every 100 ms.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from dispatcher import Dispatcher, ManifestError
from dispatcher.config import TelemetryEnvironmentError, TokenFileError
from dispatcher.gateway import GatewayServer, GatewaySettings, scrape
from dispatcher.gateway.scrape import MOST_TOKEN_BYTES, ScrapeTokenFile
from tests.conftest import ROOT
from tests.test_gateway_admin import (
    TOKEN,
    VARIABLE,
    metrics_manifest,
    raw_get,
    serving,
    start_serve,
    status_of,
)

SECOND = "sec0nd-scrape-t0ken-7a1e"
THIRD = "th1rd-scrape-t0ken-55c0"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write_token(path: Path, token: str | bytes) -> None:
    """Written aside and renamed over: how an operator (or a secret manager) swaps a file."""
    spare = path.with_name(path.name + ".new")
    spare.write_bytes(token if isinstance(token, bytes) else token.encode())
    spare.replace(path)


class SecretVolume:
    """A folder laid out as the kubelet lays out a mounted Secret: ``token`` is a symlink
    to ``..data/token``, ``..data`` a symlink to a timestamped folder, swapped atomically
    (a new folder, a new ``..data_tmp`` link renamed over ``..data``, the old one removed)."""

    def __init__(self, root: Path, token: str) -> None:
        self.root = root
        self.versions = 0
        root.mkdir()
        self.swap(token)
        (root / "token").symlink_to("..data/token")

    @property
    def token(self) -> Path:
        return self.root / "token"

    def swap(self, token: str) -> None:
        self.versions += 1
        version = self.root / f"..2026_12_04_{self.versions:04d}"
        version.mkdir()
        (version / "token").write_text(token)
        link = self.root / "..data_tmp"
        link.symlink_to(version.name)
        old = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        link.replace(self.root / "..data")
        if old is not None:
            (old / "token").unlink()
            old.rmdir()


# -- the manifest ---------------------------------------------------------------------------------


def test_token_file_and_token_env_are_one_or_the_other(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="token_env and token_file: one or the other"):
        metrics_manifest(tmp_path, token_env=VARIABLE, token_file="token")
    metrics = metrics_manifest(tmp_path, token_file="secrets/token").telemetry.metrics
    assert metrics.token_file == tmp_path / "secrets" / "token"  # from the manifest's folder


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (None, "cannot be read"),
        (b"", "is empty"),
        (b"\n", "is empty"),
        (f"{TOKEN} and more".encode(), "letters, digits and punctuation only"),
        (f"{TOKEN}\n\n{TOKEN}".encode(), "letters, digits and punctuation only"),
        (TOKEN.encode() + b"\xff", "letters, digits and punctuation only"),
        (TOKEN.encode() * 200, f"more than {MOST_TOKEN_BYTES} bytes"),
    ],
)
async def test_a_token_file_without_a_usable_token_fails_the_start_naming_the_file(
    tmp_path: Path, content: bytes | None, complaint: str
) -> None:
    path = tmp_path / "metrics-credential"
    if content is not None:
        path.write_bytes(content)
    for listen in ({"listen": "127.0.0.31:0"}, {}):
        manifest = metrics_manifest(tmp_path, token_file=str(path), **listen)
        async with Dispatcher(manifest) as dispatcher:
            server = GatewayServer(dispatcher, GatewaySettings(port=0))
            with pytest.raises(TokenFileError) as refused:
                await server.start()
            assert isinstance(refused.value, TelemetryEnvironmentError)  # serve's exit 2
            assert refused.value.path == path
            assert str(refused.value).startswith(f"{path}: "), refused.value
            assert complaint in str(refused.value)
            assert TOKEN not in str(refused.value) and TOKEN[:8] not in str(refused.value)
            assert server._listening is None and server.admin is None


def test_a_directory_or_a_pipe_is_no_token_file(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for path in (folder, pipe):
        with pytest.raises(TokenFileError, match="not a regular file"):
            ScrapeTokenFile.read(path)  # a pipe: not opened to wait for a writer


async def test_serve_refuses_a_huge_token_file_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "metrics-credential"
    path.write_bytes(TOKEN.encode() * 100_000)  # 3.8 MB, none of it read past the cap
    process = await start_serve(tmp_path, {"listen": "127.0.0.32:0", "token_file": str(path)}, None)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert stdout == b""
    assert stderr.startswith(f"error: {path}: ".encode()), stderr
    assert b"Traceback" not in stderr
    assert TOKEN.encode() not in stderr


# -- the token in time (an injected clock) -------------------------------------------------------


def test_a_trailing_newline_is_no_part_of_the_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    for written in (f"{TOKEN}\n", f"{TOKEN}\r\n", TOKEN):
        path.write_text(written)
        token = ScrapeTokenFile.read(path)
        assert token.admits(f"Bearer {TOKEN}")
        assert not token.admits(f"Bearer {TOKEN}\n")
    assert TOKEN not in repr(token) and str(path) in repr(token)


def test_a_rotation_is_seen_within_a_second_and_the_old_token_lasts_the_grace(
    tmp_path: Path,
) -> None:
    path, clock = tmp_path / "token", Clock()
    write_token(path, TOKEN)
    token = ScrapeTokenFile.read(path, grace=60.0, clock=clock)
    write_token(path, SECOND)
    # Not looked at again within the second: the old token is still the only one.
    clock.now += 0.5
    assert token.admits(f"Bearer {TOKEN}")
    assert token.rotations == 0
    # A scraper that switched first is not refused: its token makes the file be looked at.
    assert token.admits(f"Bearer {SECOND}")
    assert token.rotations == 1
    # The previous token lasts the grace from when the change was seen, then no more.
    clock.now += 59.0
    assert token.admits(f"Bearer {TOKEN}") and token.admits(f"Bearer {SECOND}")
    clock.now += 1.0
    assert not token.admits(f"Bearer {TOKEN}")
    assert token.admits(f"Bearer {SECOND}")
    # Two rotations within a grace: only the one just before the current one lasts.
    write_token(path, THIRD)
    clock.now += 1.0
    assert token.admits(f"Bearer {SECOND}")  # seen now: SECOND is the previous one
    write_token(path, TOKEN)
    clock.now += 1.0
    assert token.admits(f"Bearer {TOKEN}") and token.admits(f"Bearer {THIRD}")
    assert not token.admits(f"Bearer {SECOND}")
    assert token.rotations == 3


def test_the_file_is_looked_at_once_a_second_at_most_on_admitted_scrapes(
    tmp_path: Path,
) -> None:
    path, clock = tmp_path / "token", Clock()
    write_token(path, TOKEN)
    token = ScrapeTokenFile.read(path, grace=60.0, clock=clock)
    checks = token.checks
    for _ in range(100):
        clock.now += 0.001
        assert token.admits(f"Bearer {TOKEN}")
    assert token.checks == checks  # no stat per scrape
    clock.now += 1.0
    assert token.admits(f"Bearer {TOKEN}")
    assert token.checks == checks + 1


def test_a_file_gone_bad_keeps_the_last_token_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "dispatcher")
    path, clock = tmp_path / "token", Clock()
    write_token(path, TOKEN)
    token = ScrapeTokenFile.read(path, grace=60.0, clock=clock)
    for bad in (None, b"", b"\n", b"two words", TOKEN.encode() * 200, "folder"):
        caplog.clear()
        if bad is None:
            path.unlink()
        elif bad == "folder":
            path.unlink()
            path.mkdir()
        else:
            write_token(path, bad)  # type: ignore[arg-type]
        for _ in range(20):  # scrapes, each past the second: every one looks at the file
            clock.now += 1.5
            assert token.admits(f"Bearer {TOKEN}"), bad
            assert not token.admits(f"Bearer {SECOND}")
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, (bad, caplog.text)
        assert str(path) in warnings[0].getMessage()
        assert "the last token read from it still admits scrapes" in warnings[0].getMessage()
        if bad == "folder":
            path.rmdir()
        elif bad is not None:
            path.unlink()
        write_token(path, TOKEN)  # good again, and unchanged: no rotation
        clock.now += 1.5
        assert token.admits(f"Bearer {TOKEN}")
    assert token.rotations == 0
    # Good again with a new token: a rotation, told at INFO.
    caplog.clear()
    write_token(path, SECOND)
    clock.now += 1.5
    assert token.admits(f"Bearer {SECOND}")
    assert token.rotations == 1
    assert f"scrape token read again from {path}" in caplog.text
    assert TOKEN not in caplog.text and SECOND not in caplog.text


# -- against a real admin port, scraped every 100 ms ---------------------------------------------


async def _scrape(session: aiohttp.ClientSession, url: str, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.get(f"{url}/metrics", headers=headers) as answer:
        await answer.read()
        return answer.status


@pytest.mark.parametrize("swap", ["rename", "symlink"])
async def test_rotating_the_file_while_scraping_refuses_no_scrape(
    tmp_path: Path, swap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two scrapers every 100 ms: one reads the file at each scrape (Prometheus'
    ``credentials_file`` on the same secret), one switches 0.3 s after the file changed
    (a scraper whose copy of the secret is updated later). Neither is ever refused; the
    old token is refused once the grace (1 s here) has passed."""
    grace = 1.0
    monkeypatch.setattr(scrape, "TOKEN_FILE_GRACE_SECONDS", grace)
    if swap == "rename":
        path = tmp_path / "metrics-credential"
        write_token(path, TOKEN)
        rotate = lambda new: write_token(path, new)  # noqa: E731
    else:
        volume = SecretVolume(tmp_path / "secret", TOKEN)
        path, rotate = volume.token, volume.swap
    statuses: list[tuple[str, int]] = []
    async with (
        serving(tmp_path, listen="127.0.0.33:0", token_file=str(path)) as (_, server),
        aiohttp.ClientSession() as session,
    ):
        assert server.admin is not None
        url = server.admin.url
        lagging = TOKEN
        stop = asyncio.Event()

        async def follower() -> None:
            while not stop.is_set():
                token = path.read_text().rstrip("\n")
                statuses.append(("follower", await _scrape(session, url, token)))
                await asyncio.sleep(0.1)

        async def lagger() -> None:
            while not stop.is_set():
                statuses.append(("lagging", await _scrape(session, url, lagging)))
                await asyncio.sleep(0.1)

        scrapers = [asyncio.create_task(follower()), asyncio.create_task(lagger())]
        try:
            for new in (SECOND, THIRD):
                await asyncio.sleep(0.5)
                old = lagging
                rotate(new)
                await asyncio.sleep(0.3)
                lagging = new
                await asyncio.sleep(0.5)
                assert (
                    status_of(await raw_get(url, "/metrics", f"Authorization: Bearer {old}")) == 200
                )
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.gather(*scrapers)
        assert len(statuses) > 30
        refused = [each for each in statuses if each[1] != 200]
        assert not refused, refused
        # Past the grace (and the second the change may take to be seen): refused.
        await asyncio.sleep(grace + 1.2)
        assert status_of(await raw_get(url, "/metrics", f"Authorization: Bearer {SECOND}")) == 401
        assert status_of(await raw_get(url, "/metrics", f"Authorization: Bearer {TOKEN}")) == 401
        assert await _scrape(session, url, THIRD) == 200
        assert "rotations=2" in repr(server.admin)


async def test_an_unreadable_file_keeps_the_last_token_on_the_admin_port(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    volume = SecretVolume(tmp_path / "secret", TOKEN)
    async with serving(tmp_path, listen="127.0.0.34:0", token_file=str(volume.token)) as (
        _,
        server,
    ):
        assert server.admin is not None
        url = server.admin.url
        # The secret's folder taken away under the link (the volume unmounted): dangling.
        (volume.root / "..data").unlink()
        async with aiohttp.ClientSession() as session:
            for _ in range(15):
                assert await _scrape(session, url, TOKEN) == 200
                assert await _scrape(session, url, SECOND) == 401
                await asyncio.sleep(0.1)
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "token" in r.getMessage()
    ]
    assert len(warnings) == 1, caplog.text
    assert TOKEN not in caplog.text


# -- dispatcher top ---------------------------------------------------------------------------------


async def test_top_reads_the_admin_port_with_the_token_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics-credential"
    path.write_text(TOKEN + "\n")
    serve = await start_serve(tmp_path, {"listen": "127.0.0.35:0", "token_file": str(path)}, None)
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'sdk' / 'python'}"}
    environment[VARIABLE] = TOKEN

    async def top(*options: str) -> tuple[int | None, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dispatcher.cli", "top", "--once", "--interval", "0.2",
            *options,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode, out.decode() + err.decode()

    try:
        assert serve.stdout is not None
        await asyncio.wait_for(serve.stdout.readline(), 60)  # the gateway's port
        admin = (await asyncio.wait_for(serve.stdout.readline(), 60)).decode().split()[-1]
        code, shown = await top("--url", admin, "--token-file", str(path))
        assert code == 0, shown
        assert "CALLS/S" in shown
        code, shown = await top("--url", admin, "--token-file", str(path), "--token-env", VARIABLE)
        assert code == 2
        assert "error: --token-env or --token-file: one of them, not both" in shown
        for content in (None, b"\n", TOKEN.encode() * 200):
            wrong = tmp_path / "wrong-credential"
            wrong.unlink(missing_ok=True)
            if content is not None:
                wrong.write_bytes(content)
            code, shown = await top("--url", admin, "--token-file", str(wrong))
            assert code == 2, shown
            assert shown.startswith(f"error: --token-file {wrong}: the file "), shown
            assert TOKEN not in shown
    finally:
        serve.send_signal(signal.SIGTERM)
        await asyncio.wait_for(serve.wait(), 30)
