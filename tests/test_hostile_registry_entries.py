"""Hostile registry entries (``registry:`` in etcd): values that cost the host far more
than their size to read (YAML aliases that expand exponentially, nesting deeper than the
interpreter's stack), each refused by name, never quoted, while the good entries apply.
A real etcd; the first tests read the trust rules alone.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import pytest

from dispatcher import ManifestError, parse_manifest
from dispatcher.config import RegistryConfig, merge_entries
from dispatcher.config.registry import entry_item
from tests.conftest import LOCAL_TARGET, ROOT, echo_plugin
from tests.services import Etcd, until
from tests.test_registry_entries import (
    SECRET,
    dispatcher_for,
    entry,
    greeters,  # noqa: F401 (a fixture)
    greeting,
    keys,
    manifest_with_registry,
)

CONFIG = RegistryConfig(etcd="http://127.0.0.1:2379", prefix="/p")  # type: ignore[arg-type]
TARGET = "{provider: http, url: 'http://127.0.0.1:1/'"


def laughs(levels: int, version: str = "1.0.0") -> str:
    """A YAML entry of a few hundred bytes whose aliases expand to 10**levels strings."""
    lines = [
        f"id: echo\nversion: {version}\nmethods: {{say: {{}}}}",
        f"l0: &l0 [{SECRET}" + ", x" * 9 + "]",
    ]
    for level in range(1, levels + 1):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    lines.append(f"target: {TARGET}, extra: *l{levels}}}")
    return "\n".join(lines) + "\n"


def deep_yaml(depth: int, version: str = "1.0.0") -> str:
    return f"id: echo\nversion: {version}\ntarget: {TARGET}, extra: {'[' * depth}{']' * depth}}}\n"


def deep_json(depth: int, version: str = "1.0.0") -> str:
    nested = "[" * depth + "]" * depth
    return (
        f'{{"id": "echo", "version": "{version}", "methods": {{"say": {{}}}},'
        f' "target": {{"provider": "http", "url": "http://127.0.0.1:1/", "extra": {nested}}}}}'
    )


def test_yaml_aliases_are_refused_before_they_expand() -> None:
    # 10**7 strings: seconds of the event loop's time to walk, before this was refused.
    with pytest.raises(ValueError, match="alias") as refused:
        entry_item("/p/echo@1.0.0", laughs(7).encode(), CONFIG)
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize("value", [deep_yaml(20_000), deep_json(1_000), deep_yaml(200)])
def test_nesting_deeper_than_an_entry_needs_is_refused_not_a_recursion_error(
    value: str,
) -> None:
    with pytest.raises(ValueError, match="nested deeper"):
        entry_item("/p/echo@1.0.0", value.encode(), CONFIG)


def test_an_entry_nested_as_deep_as_a_real_one_is_read() -> None:
    assert entry_item("/p/echo@1.0.0", deep_yaml(20).encode(), CONFIG)["id"] == "echo"
    assert entry_item("/p/echo@1.0.0", deep_json(20).encode(), CONFIG)["id"] == "echo"


async def test_costly_entries_are_left_out_and_the_good_one_applies(
    etcd: Etcd,
    etcd_prefix: str,
    greeters: dict[str, str],  # noqa: F811 (the fixture)
    caplog: pytest.LogCaptureFixture,
) -> None:
    hostile = {
        "echo@9.0.0": laughs(7, "9.0.0"),
        "echo@9.0.1": deep_yaml(20_000, "9.0.1"),
        "echo@9.0.2": deep_json(1_000, "9.0.2"),
    }
    caplog.set_level(logging.WARNING, logger="dispatcher")
    for name, value in hostile.items():
        etcd.put(f"{etcd_prefix}/{name}", value)
    etcd.put(f"{etcd_prefix}/echo@1.0.0", entry(greeters["one"]))
    async with dispatcher_for(manifest_with_registry(etcd, etcd_prefix)) as dispatcher:
        await until(lambda: "echo@1.0.0" in keys(dispatcher), "the good entry")
        assert await greeting(dispatcher) == "one"
        skipped = {
            key.rsplit("/", 1)[1]: reason
            for key, reason in dispatcher.stats()["registry"]["skipped"].items()
        }
        assert set(skipped) == set(hostile), skipped
        assert "alias" in skipped["echo@9.0.0"]
        assert "nested deeper" in skipped["echo@9.0.1"]
        assert "nested deeper" in skipped["echo@9.0.2"]
    assert SECRET not in caplog.text + json.dumps(skipped)


def fallback_entry(plugin: str, where: str) -> bytes:
    fallback = {"fallback": {"plugin": plugin, "on": ["target_unavailable"]}}
    document: dict[str, object] = {
        "id": "echo",
        "version": "1.0.0",
        "target": {"provider": "http", "url": "http://127.0.0.1:1/"},  # never answers
        "methods": {"say": fallback if where == "method" else {}},
    }
    if where == "defaults":
        document["defaults"] = fallback
    return json.dumps(document).encode()


@pytest.mark.parametrize("where", ["method", "defaults"])
def test_a_fallback_to_a_plugin_entries_may_not_declare_is_refused(where: str) -> None:
    """A fallback runs with the access the caller had to the entry: an entry whose target
    never answers and whose fallback names the file's ``payments`` would hand every caller
    of ``echo.say`` the file's ``payments.say``."""
    with pytest.raises(ValueError, match="fallback"):
        entry_item("/p/echo@1.0.0", fallback_entry("payments", where), CONFIG)
    trusted = CONFIG.model_copy(
        update={"trust": CONFIG.trust.model_copy(update={"allow_plugins": ["echo", "mirror"]})}
    )
    with pytest.raises(ValueError, match="fallback"):
        entry_item("/p/echo@1.0.0", fallback_entry("payments", where), trusted)
    assert entry_item("/p/echo@1.0.0", fallback_entry("mirror", where), trusted)["id"] == "echo"


@pytest.mark.parametrize(
    "url",
    [
        "http://169\u3002254\u3002169\u3002254/",  # ideographic full stops
        "http://169\uff0e254\uff0e169\uff0e254/",  # fullwidth full stops
        "http://[::ffff:169.254.169.254]/",
    ],
)
def test_an_entry_naming_link_local_in_disguise_is_refused_by_egress(url: str) -> None:
    """aiohttp maps these spellings to an address and dials it without resolving: the
    load-time check must read them the same way."""
    document = {
        "version": 1,
        "plugins": [echo_plugin("main", LOCAL_TARGET)],
        "registry": {"etcd": "http://127.0.0.1:2379", "prefix": "/p"},
    }
    manifest = parse_manifest(document, base_dir=ROOT)
    value = json.dumps(
        {
            "id": "echo",
            "version": "1.0.0",
            "target": {"provider": "http", "url": url},
            "methods": {"say": {}},
        }
    ).encode()
    item = entry_item("/p/echo@1.0.0", value, CONFIG)
    merged, skipped = merge_entries(manifest, {"/p/echo@1.0.0": item}, source="test")
    assert [plugin.key for plugin in merged.plugins] == ["main@1.0.0"]
    assert "link-local" in skipped["/p/echo@1.0.0"], skipped


def put_entries(etcd: Etcd, values: dict[str, str]) -> None:
    """Many keys at once, 128 to a transaction (etcd's default bound)."""
    items = list(values.items())
    for start in range(0, len(items), 128):
        puts = [
            {"requestPut": {"key": b64(key), "value": b64(value)}}
            for key, value in items[start : start + 128]
        ]
        etcd.call("/v3/kv/txn", {"success": puts})


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_entries_past_max_entries_are_counted_not_kept_nor_applied(
    etcd: Etcd, etcd_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Entries had no bound: every key trust allowed was kept, parsed and attached as a
    plugin version, and every key it refused was kept, listed (one health row each) and
    logged. Whoever writes the prefix chose how many plugin versions the host ran and how
    much of its memory and log they filled. Now the first ``trust.max_entries`` keys in
    order apply (the same on every replica), the others are counted and not even parsed,
    refusals are listed up to the same bound, and the overflow is logged sparingly."""
    caplog.set_level(logging.WARNING, logger="dispatcher.registry")
    url = "http://127.0.0.1:1/"  # never called
    for version in ("1.0.0", "1.0.1", "1.0.2"):
        etcd.put(f"{etcd_prefix}/echo@{version}", entry(url, version))
    document = manifest_with_registry(etcd, etcd_prefix, trust={"max_entries": 3})
    async with dispatcher_for(document) as dispatcher:
        await until(lambda: "echo@1.0.2" in keys(dispatcher), "the first entries")
        past = {f"{etcd_prefix}/echo@2.0.{n}": entry(url, f"2.0.{n}") for n in range(50)}
        junk = {f"{etcd_prefix}/a-junk{n:02d}@1.0.0": "not a mapping" for n in range(50)}
        await asyncio.to_thread(put_entries, etcd, {**past, **junk})
        # First in key order after the junk: once it applies, every key before it was read.
        etcd.put(f"{etcd_prefix}/aaa@1.0.0", entry(url, "1.0.0", "aaa"))
        await until(lambda: "aaa@1.0.0" in keys(dispatcher), "the last entry")
        assert keys(dispatcher) == {"main@1.0.0", "aaa@1.0.0", "echo@1.0.0", "echo@1.0.1"}
        stats = dispatcher.stats()["registry"]
        assert stats["entries"] == [
            f"{etcd_prefix}/aaa@1.0.0",
            *sorted(f"{etcd_prefix}/echo@1.0.{n}" for n in range(2)),
        ]
        assert stats["dropped"] == 51  # the 50 past, and echo@1.0.2 aaa pushed out
        assert len(stats["skipped"]) == 3 and stats["unlisted"] == 47
        assert len(await dispatcher.health()) < 20
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) <= 6, lines  # 3 refusals named, each overflow once
        assert sum("max_entries" in line for line in lines) == 1
        assert sum("refused by trust" in line for line in lines) == 1


async def test_a_prefix_over_one_answer_is_read_in_pages(
    etcd: Etcd,
    etcd_prefix: str,
    greeters: dict[str, str],  # noqa: F811 (the fixture)
) -> None:
    """The prefix was read in one range answer, which may not pass 8 MiB: 300 large
    values before the good entry (9.4 MiB) failed every read, and the dispatcher ran
    without any registry entry, for ever. Read in pages now: the junk is refused by name
    and the entry after it applies."""
    junk = {f"{etcd_prefix}/a-junk{n:03d}@1.0.0": "x" * 32 * 1024 for n in range(300)}
    for start in range(0, 300, 24):  # under etcd's 1.5 MiB to a request
        await asyncio.to_thread(put_entries, etcd, dict(list(junk.items())[start : start + 24]))
    etcd.put(f"{etcd_prefix}/echo@1.0.0", entry(greeters["one"]))
    async with dispatcher_for(manifest_with_registry(etcd, etcd_prefix)) as dispatcher:
        await until(lambda: "echo@1.0.0" in keys(dispatcher), "the entry after the junk")
        assert await greeting(dispatcher) == "one"
        stats = dispatcher.stats()["registry"]
        assert stats["error"] is None and stats["reads"] == 1
        assert set(stats["skipped"]) == set(junk)


@pytest.mark.parametrize("bound", [0, -1, 10_001, "many", 2.5, None])
def test_a_malformed_entry_bound_is_refused_at_load(bound: object) -> None:
    """``trust.max_entries`` outside 1 … 10,000, or not a whole number, is the manifest's
    error naming the field: a bound of none would apply nothing, one past the range would
    let a registry fill the dispatcher's memory."""
    document = {
        "version": 1,
        "plugins": [echo_plugin("main", LOCAL_TARGET)],
        "registry": {
            "etcd": "http://127.0.0.1:1",
            "prefix": "/p/",
            "trust": {"max_entries": bound},
        },
    }
    with pytest.raises(ManifestError, match="max_entries"):
        parse_manifest(document, base_dir=ROOT)


async def test_an_etcd_outage_is_logged_once_when_it_begins_and_once_when_it_ends(
    own_etcd: Etcd, etcd_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The registry of entries logged a warning at every failed read: retrying every
    50 ms, growing to 400 ms, a 2-second outage wrote a dozen lines, an hour-long one
    at the defaults hundreds. As a fleet's source does: one when reads begin to fail,
    one when they work again."""
    caplog.set_level(logging.WARNING, logger="dispatcher.registry")
    document = manifest_with_registry(own_etcd, etcd_prefix, timeout_ms=300, retry_ms=50)
    async with dispatcher_for(document) as dispatcher:
        registry = dispatcher.registry
        assert registry is not None and registry.reads == 1
        own_etcd.stop()
        await until(lambda: registry.error is not None, "the registry's error")
        await asyncio.sleep(2)  # many failed reads later
        own_etcd.start()
        await until(lambda: registry.error is None, "etcd read again", timeout=60)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"cannot read etcd {own_etcd.url}") and "entries" in lines[0]
    assert "again after" in lines[1] and lines[1].endswith("0 entries"), lines[1]
