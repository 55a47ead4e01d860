"""A uid of its own for each sandboxed plugin (``providers.subprocess.uids``): claimed with
``flock`` so that no two plugins, of one dispatcher or of two, hold the same one. Real lock
files in a folder of the test's, another process for the other dispatcher."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from dispatcher import Dispatcher
from providers.capabilities import Capabilities
from providers.subprocess import HandshakeError
from providers.subprocess.sandbox import sandboxed_launch
from providers.subprocess.target import SubprocessSandbox
from providers.subprocess.uids import PLUGIN_UIDS, UidUnavailable, claim_uid
from tests.conftest import manifest

UIDS = range(3_000_000_000, 3_000_000_000 + 8)  # none of the host's, nor the dispatcher's


def test_two_plugins_never_hold_the_same_uid_and_a_released_one_is_offered_again(
    tmp_path: Path,
) -> None:
    first = claim_uid("calc", uids=UIDS, folder=tmp_path)
    second = claim_uid("calc", uids=UIDS, folder=tmp_path)  # another process of "calc"
    assert first.uid != second.uid
    assert {first.uid, second.uid} <= set(UIDS)
    first.release()
    again = claim_uid("calc", uids=UIDS, folder=tmp_path)
    assert again.uid == first.uid  # its id's uid: files it wrote are still its own
    for claim in (second, again):
        claim.release()


def test_a_uid_claimed_by_another_dispatcher_is_not_handed_out_until_that_one_dies(
    tmp_path: Path,
) -> None:
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys
                from pathlib import Path
                from providers.subprocess.uids import claim_uid
                claim = claim_uid("calc", uids=range({UIDS.start}, {UIDS.stop}),
                                  folder=Path({str(tmp_path)!r}))
                print(claim.uid, flush=True)
                sys.stdin.read()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ) as other:
        assert other.stdout is not None
        theirs = int(other.stdout.readline())
        ours = claim_uid("calc", uids=UIDS, folder=tmp_path)
        assert ours.uid != theirs
        ours.release()
        other.kill()  # however a dispatcher dies, its descriptors and so its claims go
    freed = claim_uid("calc", uids=UIDS, folder=tmp_path)
    assert freed.uid == theirs
    freed.release()


def test_a_uid_the_user_database_names_is_never_handed_out(tmp_path: Path) -> None:
    try:
        pwd.getpwuid(65534)
    except KeyError:
        pytest.skip("no user 65534 here")
    claim = claim_uid("any", uids=range(65534, 65536), folder=tmp_path)
    assert claim.uid == 65535
    with pytest.raises(UidUnavailable, match="every uid of 65534-65535 is claimed"):
        claim_uid("any", uids=range(65534, 65536), folder=tmp_path)
    claim.release()


def test_a_claims_folder_that_cannot_be_made_is_a_uid_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UidUnavailable, match="cannot make"):
        claim_uid("calc", uids=UIDS, folder=tmp_path / "file" / "claims")


@pytest.mark.skipif(os.geteuid() != 0, reason="plugins run as users of their own only as root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv")
def test_a_plugin_without_a_uid_of_its_own_runs_as_65534_and_says_what_it_shares() -> None:
    launch = sandboxed_launch(
        ["/bin/true"],
        SubprocessSandbox(),
        Capabilities(),
        "/tmp",
        own_uid_failure="cannot make /run/linchkit/plugin-uids: Read-only file system",
    )
    launch.close()
    assert launch.run_as == (65534, 65534)
    assert any(
        line.startswith("user: no uid of its own (cannot make /run/linchkit/plugin-uids")
        and "inotify instances" in line
        for line in launch.translation.unenforced
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="plugins run as users of their own only as root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv")
def test_inspect_says_the_uid_is_claimed_at_launch_and_an_explicit_user_is_kept() -> None:
    described = sandboxed_launch(["/bin/true"], SubprocessSandbox(), Capabilities(), "/tmp")
    described.close()
    assert (
        f"user: a uid of its own, claimed at launch from {PLUGIN_UIDS.start}-"
        f"{PLUGIN_UIDS.stop - 1}" in described.translation.enforced
    )
    chosen = sandboxed_launch(
        ["/bin/true"], SubprocessSandbox(user="1234:5678"), Capabilities(), "/tmp"
    )
    chosen.close()
    assert chosen.run_as == (1234, 5678)
    assert "user: 1234:5678 (sandbox.user)" in chosen.translation.enforced


@pytest.mark.skipif(os.geteuid() != 0, reason="plugins run as users of their own only as root")
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
async def test_a_plugin_that_fails_to_start_lets_go_of_its_uid() -> None:
    plugin = {
        "id": "never-starts",
        "version": "1.0.0",
        "target": {"provider": "subprocess", "command": ["/bin/false"], "sandbox": True},
        "methods": {"x": {}},
    }
    with pytest.raises(HandshakeError, match="exited with code 1 before its handshake"):
        async with Dispatcher(manifest(plugin)):
            pass
    claim = claim_uid("never-starts")  # its own uid, free again (no stop follows)
    try:
        assert claim.uid == PLUGIN_UIDS[zlib.crc32(b"never-starts") % len(PLUGIN_UIDS)]
    finally:
        claim.release()
