"""Who may call what: the rule matrix, look-alike names, and the checks in ``Dispatcher.call``.

Every (roles, plugin, version, method) is decided by ``AccessControl`` and compared with an
oracle written out by hand from the rules; 0 wrongly allowed. Then the dispatcher: no
principal → ``Unauthorized`` before any policy (the limiter and the cache untouched),
``Forbidden`` naming who and what, the principal's id as the plugin's caller and as the
key of ``scope: caller`` rate limits.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from dispatcher import Dispatcher
from dispatcher.access import AccessControl
from dispatcher.config import AccessConfig, parse_manifest
from dispatcher.identity import UNAUTHORIZED_MESSAGE, Credentials, Principal, api_key_digest
from linchkit_plugin.errors import (
    Forbidden,
    MethodNotFound,
    PluginNotFound,
    RateLimited,
    Unauthorized,
)
from tests.conftest import LOCAL_TARGET, ROOT, echo_plugin

RULES = {
    "billing": {"allow": ["billing.*", "echo@1.*.say"], "deny": ["billing.admin_*"]},
    "admin": {"allow": ["*"]},
    "reader": {"allow": ["echo.say", "echo.dig?st"]},
    "auditor": {"allow": ["billing@2.[0-9].*"], "deny": ["*.refund"]},
    "nobody": {},
}
SURFACE = [
    ("echo", "1.0.0", ["say", "digest", "sleep", "withdraw"]),
    ("echo", "2.0.0", ["say", "digest", "sleep", "withdraw"]),
    ("billing", "1.0.0", ["charge", "refund", "admin_reset", "admin"]),
    ("billing", "2.1.0", ["charge", "refund", "admin_reset"]),
    ("billing-x", "1.0.0", ["charge"]),
]


def allowed_by_hand(role: str, plugin: str, version: str, method: str) -> bool:
    """The rules above, read by a person, for one role."""
    if role == "admin":
        return True
    if role == "billing":
        return (plugin == "billing" and not method.startswith("admin_")) or (
            plugin,
            version[:2],
            method,
        ) == ("echo", "1.", "say")
    if role == "reader":
        return plugin == "echo" and method in ("say", "digest")
    if role == "auditor":
        return plugin == "billing" and version.startswith("2.") and method != "refund"
    return False


def denied_by_hand(role: str, plugin: str, method: str) -> bool:
    return (role == "billing" and plugin == "billing" and method.startswith("admin_")) or (
        role == "auditor" and method == "refund"
    )


def test_every_role_combination_times_every_method_is_decided_as_the_rules_say() -> None:
    access = AccessControl(AccessConfig.model_validate({"roles": RULES}))
    roles = [*RULES, "unknown-role"]
    wrongly_allowed = wrongly_denied = decisions = 0
    for size in range(4):
        for combination in itertools.combinations(roles, size):
            principal = Principal("p", frozenset(combination))
            for plugin, version, methods in SURFACE:
                for method in methods:
                    expected = any(
                        allowed_by_hand(r, plugin, version, method) for r in combination
                    ) and not any(denied_by_hand(r, plugin, method) for r in combination)
                    got = access.allows(principal, plugin, version, method)
                    decisions += 1
                    wrongly_allowed += got and not expected
                    wrongly_denied += expected and not got
    assert decisions == 672  # 42 combinations of up to 3 of 6 roles x 16 methods
    assert (wrongly_allowed, wrongly_denied) == (0, 0)


LOOK_ALIKES = [
    ("echo ", "say"),
    (" echo", "say"),
    ("echo", "say "),
    ("echo", "Say"),
    ("Echo", "say"),
    ("ECHO", "SAY"),
    ("echo/../admin", "x"),
    ("echo", "../admin.x"),
    ("echo/../billing", "charge"),
    ("ech\u043e", "say"),  # Cyrillic o
    ("echo", "s\u0430y"),  # Cyrillic a
    ("\uff45cho", "say"),  # fullwidth e
    ("echo\x00", "say"),
    ("echo", "say\x00admin"),
    ("echo\u200b", "say"),  # zero-width space
    ("echo", "say\n"),
    ("", "say"),
    ("echo", ""),
    ("billing", "admin_reset\t"),
    ("bil\u200bling", "charge"),
    ("e" * 10_000, "say"),
]


@pytest.mark.parametrize(("plugin", "method"), LOOK_ALIKES)
def test_look_alike_names_are_denied(plugin: str, method: str) -> None:
    access = AccessControl(AccessConfig.model_validate({"roles": RULES}))
    for role in ("billing", "reader", "auditor"):
        for version in ("1.0.0", "2.1.0"):
            assert not access.allows(Principal("p", frozenset({role})), plugin, version, method)
    if not plugin.isascii() or not method.isascii() or not (plugin + method).isprintable():
        # Not even the wildcard admin reaches a name that is not an identifier.
        assert not access.allows(Principal("root", frozenset({"admin"})), plugin, "1.0.0", method)


def test_rules_that_cannot_mean_anything_are_manifest_errors() -> None:
    for bad in ["echo", "ech\u043e.say", "echo.say ", "a@1@2.x", "echo.(say)"]:
        with pytest.raises(ValueError, match=r"rule|names no method"):
            AccessConfig.model_validate({"roles": {"r": {"allow": [bad]}}})


# -- through the dispatcher ---------------------------------------------------------

API_KEY = "lk_test_" + "ab12" * 10


def guarded_manifest(tmp_path: Path, *, access: bool = True, **extra: Any) -> Any:
    say = {
        "rate_limit": {"rate": 0.001, "burst": 1, "scope": "caller", "mode": "reject"},
    }
    digest = {"pure": True, "cache": {"ttl_ms": 60_000}}
    plugin = echo_plugin("echo", LOCAL_TARGET)
    plugin["methods"].update({"say": say, "digest": digest})
    document: dict[str, Any] = {"version": 1, "plugins": [plugin], **extra}
    if access:
        document["access"] = {"roles": {"talker": {"allow": ["echo.*"], "deny": ["echo.withdraw"]}}}
    document.setdefault(
        "auth",
        {
            "api_keys": [
                {"principal": "svc", "sha256": api_key_digest(API_KEY), "roles": ["talker"]}
            ]
        },
    )
    return parse_manifest(document, base_dir=tmp_path if tmp_path else ROOT)


async def test_no_principal_is_unauthorized_before_any_policy_runs(tmp_path: Path) -> None:
    alice = Principal("alice", frozenset({"talker"}))
    async with Dispatcher(guarded_manifest(tmp_path)) as dispatcher:
        for caller in (None, "alice", "admin"):
            for method, params in (("say", {"text": "x"}), ("digest", {"data": "d"})):
                with pytest.raises(Unauthorized) as refused:
                    await dispatcher.call("echo", method, params, caller=caller)
                assert refused.value.message == UNAUTHORIZED_MESSAGE
            # A name that does not exist is no different: nothing is listed.
            with pytest.raises(Unauthorized):
                await dispatcher.call("nope", "x", caller=caller)
        caches = dispatcher.stats()["caches"]
        assert all(cache["hits"] + cache["misses"] == 0 for cache in caches.values())
        # The caller-scoped limiter (burst 1) was never touched: alice's first call passes.
        assert (await dispatcher.call("echo", "say", {"text": "hi"}, caller=alice))[
            "caller"
        ] == "alice"
        with pytest.raises(RateLimited):
            await dispatcher.call("echo", "say", {"text": "again"}, caller=alice)
        # Another principal has a bucket of its own: the principal's id is the scope.
        bob = Principal("bob", frozenset({"talker"}))
        assert (await dispatcher.call("echo", "say", {"text": "hi"}, caller=bob))["caller"] == "bob"


async def test_forbidden_names_who_and_what_and_hides_what_exists(tmp_path: Path) -> None:
    talker = Principal("carol", frozenset({"talker"}))
    stranger = Principal("mallory", frozenset({"unknown"}))
    async with Dispatcher(guarded_manifest(tmp_path)) as dispatcher:
        with pytest.raises(Forbidden) as refused:
            await dispatcher.call("echo", "withdraw", {"amount": 1}, caller=talker)
        assert "'carol'" in refused.value.message and "'echo'.'withdraw'" in refused.value.message
        for plugin, method in [("echo", "say"), ("billing", "charge"), ("echo", "nope")]:
            with pytest.raises(Forbidden) as hidden:
                await dispatcher.call(plugin, method, {"text": "x"}, caller=stranger)
            assert "known" not in hidden.value.message and "it has" not in hidden.value.message
        with pytest.raises(Forbidden):  # a principal with no roles at all
            await dispatcher.call("echo", "say", {"text": "x"}, caller=Principal("nobody"))
    admin = Principal("root", frozenset({"admin"}))
    document = guarded_manifest(tmp_path)
    async with Dispatcher(
        parse_manifest(
            {
                **document.model_dump(exclude_unset=True, mode="json"),
                "access": {"roles": {"admin": {"allow": ["*"]}}},
            },
            base_dir=tmp_path,
        )
    ) as dispatcher:
        with pytest.raises(PluginNotFound):  # allowed everything: it may learn what exists
            await dispatcher.call("billing", "charge", caller=admin)
        with pytest.raises(MethodNotFound):
            await dispatcher.call("echo", "nope", caller=admin)


async def test_credentials_are_authenticated_by_the_dispatcher(tmp_path: Path) -> None:
    async with Dispatcher(guarded_manifest(tmp_path)) as dispatcher:
        answer = await dispatcher.call(
            "echo", "say", {"text": "x"}, credentials=Credentials(api_key=API_KEY)
        )
        assert answer["caller"] == "svc"
        for credentials in (
            Credentials(api_key="wrong"),
            Credentials(),
            Credentials(authorization="Bearer x"),
        ):
            with pytest.raises(Unauthorized):
                await dispatcher.call("echo", "say", {"text": "x"}, credentials=credentials)
        principal = await dispatcher.authenticator.authenticate(Credentials(api_key=API_KEY))  # type: ignore[union-attr]
        assert principal == Principal("svc", frozenset({"talker"}), "api_key")


async def test_without_access_everything_is_allowed_and_principals_still_flow(
    tmp_path: Path,
) -> None:
    async with Dispatcher(guarded_manifest(tmp_path, access=False)) as dispatcher:
        assert not dispatcher._guarded  # the hot path: one attribute check, nothing more
        plain = await dispatcher.call("echo", "say", {"text": "x"}, caller="alice")
        anonymous = await dispatcher.call("echo", "digest", {"data": "x", "rounds": 1})
        proven = await dispatcher.call("echo", "say", {"text": "x"}, caller=Principal("dave"))
        assert (plain["caller"], proven["caller"]) == ("alice", "dave")
        assert isinstance(anonymous, str)
        many = await dispatcher.call_many(
            [("echo", "digest", {"data": "a", "rounds": 1})], caller=Principal("erin")
        )
        assert len(many) == 1


async def test_events_are_checked_like_methods(tmp_path: Path) -> None:
    async with Dispatcher(guarded_manifest(tmp_path)) as dispatcher:
        with pytest.raises(Unauthorized):
            await dispatcher.publish("echo", "refresh", {})
        with pytest.raises(Forbidden):
            await dispatcher.publish(
                "echo", "refresh", {}, caller=Principal("x", frozenset({"nope"}))
            )
        # Allowed: it passes the checks and reaches the plugin, whose class has no
        # on_event (dropped there, as the SDK's servers drop it).
        await dispatcher.publish(
            "echo", "refresh", {}, caller=Principal("x", frozenset({"talker"}))
        )


def test_the_cli_authenticates_with_an_api_key_from_the_environment(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dispatcher.cli import main

    (tmp_path / "plugins.yaml").write_text(
        "version: 1\n"
        "plugins:\n"
        f"  - {{id: echo, version: 1.0.0, target: {{provider: local, entrypoint: 'echo_plugin:EchoPlugin', path: '{LOCAL_TARGET['path']}'}},"
        " methods: {say: {}}}\n"
        f"auth: {{api_keys: [{{principal: svc, sha256: '{api_key_digest(API_KEY)}', roles: [talker]}}]}}\n"
        "access: {roles: {talker: {allow: ['echo.*']}}}\n"
    )
    runner = CliRunner()
    arguments = ["-m", str(tmp_path / "plugins.yaml"), "call", "echo.say", "-p", '{"text": "hi"}']
    refused = runner.invoke(main, arguments)
    assert refused.exit_code == 1 and '"unauthorized"' in refused.output
    allowed = runner.invoke(main, arguments, env={"DISPATCHER_API_KEY": API_KEY})
    assert allowed.exit_code == 0 and '"caller": "svc"' in allowed.output
    wrong = runner.invoke(main, arguments, env={"DISPATCHER_API_KEY": "nope"})
    assert wrong.exit_code == 1 and "nope" not in wrong.output


def test_the_cli_leaves_credentials_out_when_the_manifest_has_no_auth(tmp_path: Path) -> None:
    """As the gateway: without ``auth`` every call is allowed. A DISPATCHER_API_KEY set for
    another manifest made every call here ``unauthorized`` (the library refuses what it
    cannot check)."""
    from click.testing import CliRunner

    from dispatcher.cli import main

    (tmp_path / "plugins.yaml").write_text(
        "version: 1\n"
        "plugins:\n"
        f"  - {{id: echo, version: 1.0.0, target: {{provider: local, entrypoint: 'echo_plugin:EchoPlugin', path: '{LOCAL_TARGET['path']}'}},"
        " methods: {say: {}}}\n"
    )
    arguments = ["-m", str(tmp_path / "plugins.yaml"), "call", "echo.say", "-p", '{"text": "hi"}']
    runner = CliRunner()
    for environment in ({"DISPATCHER_API_KEY": API_KEY}, {"DISPATCHER_TOKEN": "a.b.c"}):
        answered = runner.invoke(main, arguments, env=environment)
        assert answered.exit_code == 0, answered.output
        assert '"text": "hi"' in answered.output


def test_a_principal_takes_its_roles_as_any_collection_and_keeps_them_frozen() -> None:
    """Typed as any iterable: ``Principal("bob", {"ops"})`` worked but failed mypy --strict."""
    import dataclasses

    by_set, by_list = Principal("bob", {"ops", "dev"}), Principal("bob", roles=["dev", "ops"])
    assert by_set == by_list and hash(by_set) == hash(by_list)
    assert by_set.roles == frozenset({"ops", "dev"}) and type(by_list.roles) is frozenset
    assert dataclasses.replace(by_set, proven_by="jwt").roles == by_set.roles
    with pytest.raises(TypeError, match="not one string"):
        Principal("bob", "ops")
