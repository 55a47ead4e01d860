"""The manifest: valid files load; every invalid one says where and what, all at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dispatcher import ManifestError, load_manifest
from providers.http import HttpTarget
from providers.local import LocalTarget

VALID_YAML = """\
version: 1
plugins:
  - id: echo
    version: 1.2.3-beta.1
    target: {provider: local, entrypoint: "echo_plugin:EchoPlugin", path: plugins}
    defaults: {timeout_ms: 500}
    methods:
      say: {}
      slow:
        timeout_ms: 9000
        target: {provider: http, url: "http://127.0.0.1:${TEST_PORT:-9}", bearer_token: "${TEST_TOKEN}"}
"""


def write(tmp_path: Path, text: str, name: str = "plugins.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    return [problem.render(caught.value.source) for problem in caught.value.problems]


def test_yaml_loads_with_inherited_targets_policies_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_TOKEN", "s3cret")
    manifest = load_manifest(write(tmp_path, VALID_YAML))
    plugin = manifest.plugins[0]
    say, slow = plugin.target_of("say"), plugin.target_of("slow")
    assert isinstance(say, LocalTarget)
    assert say.path == (tmp_path / "plugins").resolve()
    assert isinstance(slow, HttpTarget)
    assert str(slow.url) == "http://127.0.0.1:9/"
    assert slow.bearer_token is not None
    assert slow.bearer_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(slow)
    assert plugin.policies_of("say").timeout_ms == 500
    assert plugin.policies_of("slow").timeout_ms == 9000


def test_toml_is_accepted(tmp_path: Path) -> None:
    text = """
version = 1
[[plugins]]
id = "echo"
version = "1.0.0"
target = { provider = "local", entrypoint = "echo_plugin:EchoPlugin" }
[plugins.methods.say]
timeout_ms = 100
"""
    manifest = load_manifest(write(tmp_path, text, "plugins.toml"))
    assert manifest.plugins[0].policies_of("say").timeout_ms == 100


@pytest.mark.parametrize("anchored", [False, True], ids=["plain", "merge-key"])
def test_keys_yaml_1_1_reads_as_booleans_stay_words(tmp_path: Path, anchored: bool) -> None:
    """A fallback's ``on:`` as the README writes it (PyYAML read it as ``True`` and the
    manifest was refused: "on: required key is missing"); values are read as before."""
    fallback = "{plugin: echo-local, on: [target_unavailable, circuit_open]}"
    methods = (
        f"hi: &fallback {{fallback: {fallback}}}\n      say: {{<<: *fallback}}"
        if anchored
        else f"say: {{fallback: {fallback}}}"
    )
    text = f"""
version: 1
plugins:
  - id: echo
    version: 1.0.0
    config: {{on: 1, off: 2, yes: 3, "no": 4, debug: yes}}
    target: {{provider: http, url: "http://127.0.0.1:9"}}
    methods:
      {methods}
  - id: echo-local
    version: 1.0.0
    target: {{provider: local, entrypoint: "echo_plugin:EchoPlugin"}}
    methods:
      say: {{}}
      hi: {{}}
"""
    plugin = load_manifest(write(tmp_path, text)).plugins[0]
    assert plugin.config == {"on": 1, "off": 2, "yes": 3, "no": 4, "debug": True}
    fallback = plugin.policies_of("say").fallback
    assert fallback is not None
    assert list(fallback.on) == ["target_unavailable", "circuit_open"]


def test_every_problem_is_reported_with_file_line_and_path(tmp_path: Path) -> None:
    text = """\
version: 1
plugins:
  - id: echo
    version: "1.0"
    colour: blue
    methods:
      say:
        target:
          provider: http
          url: "not a url"
      hum: {}
      beep:
        target: {provider: lambda-typo, function: x}
"""
    found = problems(write(tmp_path, text))
    source = str(tmp_path / "plugins.yaml")
    assert (
        f"{source}:4: plugins[0].version: expected a semantic version such as 1.2.3, got '1.0'"
        in found
    )
    assert any(p.startswith(f"{source}:5: plugins[0].colour: unknown key 'colour'") for p in found)
    assert any(p.startswith(f"{source}:10: plugins[0].methods.say.target.url: ") for p in found)
    assert any(
        p.startswith(f"{source}:13: plugins[0].methods.beep.target: ") and "'lambda-typo'" in p
        for p in found
    )
    assert len(found) == 4


def test_a_method_without_any_target_is_an_error(tmp_path: Path) -> None:
    text = "plugins:\n  - id: echo\n    version: 1.0.0\n    methods:\n      say: {}\n"
    assert problems(write(tmp_path, text)) == [
        f"{tmp_path / 'plugins.yaml'}:5: plugins[0].methods.say.target: "
        "no target: set 'target' on the method or a default 'target' on the plugin"
    ]


def test_problems_found_before_the_checks_across_the_manifest_say_more_may_follow(
    tmp_path: Path,
) -> None:
    """A missing target is found only once every key is valid: the first report said
    "(1 problem)" for an unknown key alone, as if it were all."""
    text = "plugins:\n  - id: echo\n    version: 1.0.0\n    methods:\n      say: {bogus: 1}\n"
    with pytest.raises(ManifestError) as raised:
        load_manifest(write(tmp_path, text))
    assert not raised.value.complete
    assert "(1 problem; more checks run once these are fixed)" in str(raised.value)
    with pytest.raises(ManifestError) as raised:
        load_manifest(write(tmp_path, text.replace("{bogus: 1}", "{}")))
    assert raised.value.complete
    assert "(1 problem):" in str(raised.value)


def test_a_missing_environment_variable_is_an_error(tmp_path: Path) -> None:
    entry = """\
  - id: echo
    version: 1.0.0
    target: {provider: http, url: "http://${NOT_SET_ANYWHERE}"}
    methods: {say: {}}
"""
    found = problems(write(tmp_path, "plugins:\n" + entry + entry))
    assert any("environment variable NOT_SET_ANYWHERE is not set" in p for p in found)


def test_duplicate_plugin_versions(tmp_path: Path) -> None:
    entry = """\
  - id: echo
    version: 1.0.0
    target: {provider: local, entrypoint: "echo_plugin:EchoPlugin"}
    methods: {say: {}}
"""
    found = problems(write(tmp_path, "plugins:\n" + entry + entry))
    assert found == [
        f"{tmp_path / 'plugins.yaml'}:7: plugins[1].version: echo@1.0.0 is already declared at plugins[0]"
    ]


def test_invalid_params_schema_and_bad_yaml(tmp_path: Path) -> None:
    schema = """\
plugins:
  - id: echo
    version: 1.0.0
    target: {provider: local, entrypoint: "echo_plugin:EchoPlugin"}
    methods:
      say: {params_schema: {type: 12}}
"""
    assert "not a valid JSON Schema" in problems(write(tmp_path, schema))[0]
    broken = problems(write(tmp_path, "plugins: [\n  - id: x\n", "broken.yaml"))
    assert len(broken) == 1
    assert "not valid YAML" in broken[0]


def test_validate_command_exits_2_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "plugins:\n  - id: echo\n    version: one\n    methods: {}\n")
    run = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "-m", str(path), "validate"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "plugins[0].version" in run.stderr
    assert "plugins[0].methods" in run.stderr


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", ".NaN"])
@pytest.mark.parametrize(
    "policy",
    [
        "rate_limit: {rate: VALUE, burst: 10}",
        "retry: {attempts: 3, max_backoff_ms: VALUE}",
        "batch: {max_size: 10, max_wait_ms: VALUE}",
    ],
)
def test_no_number_in_a_manifest_is_infinite_or_nan(
    tmp_path: Path, policy: str, value: str
) -> None:
    """YAML spells them ``.inf`` and ``.nan``: an infinite rate or backoff is a limit that
    is not one, and NaN slips past a field that has no bound of its own."""
    path = write(
        tmp_path,
        f"""
version: 1
plugins:
  - id: echo
    version: 1.0.0
    target: {{provider: local, entrypoint: "echo_plugin:EchoPlugin"}}
    methods:
      say: {{{policy.replace("VALUE", value)}}}
""",
    )
    [problem] = problems(path)
    assert "finite number" in problem, problem


@pytest.mark.parametrize(
    ("jobs", "expected"),
    [
        (
            "{callback_backoff_ms: 5000, callback_backoff_max_ms: 1000}",
            "at least 'callback_backoff_ms'",
        ),
        ("{callback_backoff_ms: -1}", "greater than or equal to 0"),
        ("{callback_backoff_max_ms: 99999999999}", "less than or equal to 86400000"),
        ("{callback_attempts: 0}", "greater than or equal to 1"),
        ("{callback_attempts: 101}", "less than or equal to 100"),
        ("{callback_backoff_ms: .nan}", "finite number"),
    ],
)
def test_callback_retry_settings_are_bounded_and_in_order(
    tmp_path: Path, jobs: str, expected: str
) -> None:
    path = write(
        tmp_path,
        f"""
version: 1
jobs: {jobs}
plugins:
  - id: echo
    version: 1.0.0
    target: {{provider: local, entrypoint: "echo_plugin:EchoPlugin"}}
    methods: {{say: {{}}}}
""",
    )
    [problem] = problems(path)
    assert expected in problem, problem


@pytest.mark.parametrize(
    ("field", "value"),
    [("method", "say\n"), ("version", "1.0.0\n"), ("method", "say\nhidden")],
)
def test_a_name_or_version_with_a_trailing_newline_is_refused(field: str, value: str) -> None:
    """``re.match`` with ``$`` accepts one trailing newline: ``say\\n`` loaded, and the
    envelope then named a method the plugin does not have."""
    from tests.conftest import manifest

    plugin = {
        "id": "p",
        "version": value if field == "version" else "1.0.0",
        "target": {"provider": "http", "url": "http://127.0.0.1:9"},
        "methods": {value if field == "method" else "say": {}},
    }
    with pytest.raises(ManifestError) as caught:
        manifest(plugin)
    assert ("method name" if field == "method" else "semantic version") in str(caught.value)


@pytest.mark.parametrize(
    "target",
    [
        {"provider": "http", "url": "http://127.0.0.1:9", "max_response_bytes": 2**64},
        {"provider": "grpc", "address": "127.0.0.1:9", "connect_timeout_ms": 2**70},
        {"provider": "subprocess", "command": ["/bin/true"], "max_restarts": 2**64},
        {"provider": "websocket", "url": "ws://127.0.0.1:9/", "max_events_per_second": 2**64},
        {"provider": "subprocess", "command": ["/bin/true"], "protocol_versions": [1, 2**64]},
    ],
)
def test_an_integer_past_64_bits_is_refused_at_load_not_at_start(target: dict[str, object]) -> None:
    """It loaded, and ``Dispatcher`` start then failed with a bare ``TypeError`` (a
    target's key is its JSON, whose integers are 64-bit)."""
    from tests.conftest import manifest

    plugin = {"id": "p", "version": "1.0.0", "target": target, "methods": {"say": {}}}
    with pytest.raises(ManifestError, match="beyond any sensible bound"):
        manifest(plugin)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"provider": "subprocess", "command": ["/bin/true"], "env": {"A=B": "x"}}, "A=B"),
        ({"provider": "subprocess", "command": ["/bin/true"], "env": {"A": "x\0y"}}, "NUL"),
        ({"provider": "subprocess", "command": ["/bin/true", "a\0b"]}, "NUL"),
        ({"provider": "subprocess", "command": ["/bin/true"], "env": {"": "x"}}, "name"),
        ({"provider": "docker", "image": "echo:1", "env": {"TOKEN=evil\nB": "x"}}, "name"),
        ({"provider": "docker", "image": "echo:1", "command": ["run", "\0"]}, "NUL"),
    ],
)
def test_an_environment_or_command_no_process_can_take_is_refused_at_load(
    target: dict[str, object], message: str
) -> None:
    """They loaded, and the process's start then failed with a bare ``ValueError`` (or a
    container got a second ``LINCHKIT_PLUGIN_TOKEN=`` through a name holding ``=``)."""
    from tests.conftest import manifest

    plugin = {"id": "p", "version": "1.0.0", "target": target, "methods": {"say": {}}}
    with pytest.raises(ManifestError, match=message):
        manifest(plugin)


@pytest.mark.parametrize(
    "extra",
    [{"region": "us-east-1\n"}, {"qualifier": "a\nb"}, {"qualifier": "../../x?y=1"}],
)
def test_a_lambda_region_or_qualifier_aws_would_not_take_is_refused_at_load(
    extra: dict[str, str],
) -> None:
    """They loaded, and every call failed with a message over several lines."""
    from tests.conftest import manifest

    target = {"provider": "lambda", "function_name": "f", **extra}
    with pytest.raises(ManifestError, match=next(iter(extra))):
        manifest({"id": "p", "version": "1.0.0", "target": target, "methods": {"say": {}}})


KNATIVE = {"provider": "knative", "service": "echo", "ingress": "http://127.0.0.1:9"}


@pytest.mark.parametrize(
    "image",
    [
        "plug/json?x=1",  # GET /images/plug/json?x=1/json: another path and a query
        "../containers/abc",  # GET /containers/abc/json: a container, not an image
        "plug#x",  # a fragment: GET /images/plug
        "plug in:1",
        "plug:1\nRUN touch /pwned",  # base_image: another line of the generated Dockerfile
        "Plug:1",
        "plug:",
        "plug:-1",
        "plug@sha256:abc",
        "plug:" + "1" * 129,
        "a" * 256,
        "",
    ],
)
@pytest.mark.parametrize("field", ["image", "build.base_image", "deploy.image"])
def test_an_image_docker_would_not_take_is_refused_at_load(field: str, image: str) -> None:
    """The engine client puts the image into API paths (``GET /images/{image}/json``) and
    a Python plugin's Dockerfile (``FROM``): any string loaded, and reached the engine as
    another request. A Knative ``deploy.image`` loaded too, was rendered into the Service
    and applied, and the cluster said so only when it could not pull it."""
    from tests.conftest import manifest

    build = {"context": "examples/python", "entrypoint": "echo_plugin:EchoPlugin"}
    target: dict[str, object] = {"provider": "docker", "image": "echo:1", "build": build}
    if field == "image":
        target["image"] = image
    elif field == "build.base_image":
        build["base_image"] = image
    else:
        target = {**KNATIVE, "deploy": {"image": image}}
    plugin = {"id": "p", "version": "1.0.0", "target": target, "methods": {"say": {}}}
    with pytest.raises(ManifestError) as caught:
        manifest(plugin)
    (problem,) = caught.value.problems
    assert problem.path == f"plugins[0].target.{field}"
    assert "image" in problem.message
    if image:
        assert image not in str(caught.value)


@pytest.mark.parametrize(
    ("deploy", "field"),
    [
        ({"args": ["serve", "a\x00b"]}, "deploy.args"),
        ({"env": {"KEY": "a\x00b"}}, "deploy.env"),
    ],
)
def test_a_knative_deployment_no_container_can_run_is_refused_at_load(
    deploy: dict[str, object], field: str
) -> None:
    """A NUL in an argument or an environment value loaded, was applied in the Service,
    and failed only when the runtime started the revision (exec takes no NUL)."""
    from tests.conftest import manifest

    target = {**KNATIVE, "deploy": {"image": "echo:1", **deploy}}
    with pytest.raises(ManifestError) as caught:
        manifest({"id": "p", "version": "1.0.0", "target": target, "methods": {"say": {}}})
    (problem,) = caught.value.problems
    assert problem.path == f"plugins[0].target.{field}"


@pytest.mark.parametrize(
    "image",
    [
        "echo",
        "echo:1.0.0",
        "linchkit-test/echo-cli:123-456",
        "registry.example.com/plugins/echo:1.1.0",
        "localhost:5000/a/b__c/d--e.f_g:Latest_1.x",
        "Registry.Example.COM:443/echo",
        "[::1]:5000/echo",
        "echo@sha256:" + "0123456789abcdef" * 4,
        "echo:1@sha512:" + "f" * 128,
        "a" * 255 + ":" + "t" * 128,
    ],
)
def test_images_as_docker_writes_them_load(image: str) -> None:
    from providers.docker import BASE_IMAGE
    from tests.conftest import manifest

    build = {"context": "examples/python", "entrypoint": "echo_plugin:EchoPlugin"}
    for target in (
        {"provider": "docker", "image": image},
        {"provider": "docker", "image": BASE_IMAGE, "build": {**build, "base_image": image}},
        {"provider": "docker", "image": image, "build": {**build, "base_image": BASE_IMAGE}},
        {**KNATIVE, "deploy": {"image": image}},
    ):
        manifest({"id": "p", "version": "1.0.0", "target": target, "methods": {"say": {}}})


def test_the_default_stop_of_a_container_outlasts_a_plugin_s_own() -> None:
    """SIGTERM to SIGKILL, by default, is at least what every SDK's stop may take by its
    defaults (its calls in flight, then its hooks): 5 s of it killed a plugin while it still
    drained, before its hooks ran. As long as a subprocess plugin's whole stop."""
    from linchkit_plugin.stopping import STOP_GRACE_SECONDS, STOP_HOOKS_SECONDS
    from providers.docker import DockerTarget
    from providers.subprocess.target import STOP_GRACE_MS

    target = DockerTarget(provider="docker", image="echo:1")
    assert target.stop_timeout_s > STOP_GRACE_SECONDS + STOP_HOOKS_SECONDS
    assert target.stop_timeout_s == STOP_GRACE_MS / 1000


_INBOUND = {"provider": "websocket", "mode": "inbound", "token": "inbound-token-0123456789"}
_DIAL = {"provider": "websocket", "url": "ws://127.0.0.1:9/"}


@pytest.mark.parametrize(
    ("target", "field", "why"),
    [
        ({**_INBOUND, "event_buffer": 10}, "event_buffer", "host events wait in it"),
        ({**_INBOUND, "event_buffer": 1000}, "event_buffer", "host events"),  # the default
        ({**_INBOUND, "connect_timeout_ms": 2_000}, "connect_timeout_ms", "own dial"),
        ({**_INBOUND, "reconnect_backoff_ms": 20}, "reconnect_backoff_ms", "redials"),
        ({**_INBOUND, "reconnect_backoff_max_ms": 200}, "reconnect_backoff_max_ms", "redials"),
        ({**_DIAL, "principal": "billing"}, "principal", "who may dial the gateway"),
        ({**_DIAL, "balance": "round_robin"}, "balance", "not a fleet"),
        ({**_DIAL, "health_check": {}}, "health_check", "not a fleet"),
        ({**_DIAL, "outlier": {"consecutive_failures": 2}}, "outlier", "not a fleet"),
    ],
)
def test_a_websocket_setting_its_mode_would_not_use_is_refused_at_load(
    target: dict[str, object], field: str, why: str
) -> None:
    """Each loaded and did nothing: the dispatcher's dial settings on a target whose
    plugins dial the gateway, and the settings of plugins dialling in (their principal,
    their fleet's) on a dialled url, which is one connection. Now each is refused where it
    is written, naming it and why; its default, left unwritten, is fine (below)."""
    from tests.conftest import manifest

    plugin = {"id": "p", "version": "1.0.0", "target": target, "methods": {"say": {}}}
    with pytest.raises(ManifestError) as caught:
        manifest(plugin)
    (problem,) = caught.value.problems
    assert problem.path == "plugins[0].target"
    assert f"{field} is for " in problem.message
    assert "would not use it" in problem.message and why in problem.message


def test_several_such_settings_are_named_in_one_refusal() -> None:
    from tests.conftest import manifest

    target = {**_INBOUND, "event_buffer": 10, "reconnect_backoff_ms": 20}
    plugin = {"id": "p", "version": "1.0.0", "target": target, "methods": {"say": {}}}
    with pytest.raises(ManifestError) as caught:
        manifest(plugin)
    (problem,) = caught.value.problems
    assert "event_buffer, reconnect_backoff_ms are for a dialled url" in problem.message
    assert "mode: inbound would not use them" in problem.message


def test_websocket_targets_writing_only_what_their_mode_uses_load() -> None:
    """Every setting each mode uses, written; the other mode's left to their defaults,
    which the loaded targets (an inbound one copied for its plugin version, and the
    instance target of one of its connections) still read and never refuse."""
    from providers.discovery import Endpoint
    from tests.conftest import manifest

    both = {
        "token": "both-modes-token-0123456789",
        "heartbeat_ms": 2_000,
        "max_message_bytes": 65_536,
        "max_in_flight": 64,
        "max_events_per_second": 500,
        "compress": True,
    }
    inbound = {
        "provider": "websocket",
        "mode": "inbound",
        "principal": "billing",
        "balance": "round_robin",
        "health_check": {"interval_ms": 1_000, "timeout_ms": 500},
        "outlier": {"consecutive_failures": 2},
        **both,
    }
    dial = {
        **_DIAL,
        "event_buffer": 10,
        "connect_timeout_ms": 2_000,
        "reconnect_backoff_ms": 20,
        "reconnect_backoff_max_ms": 200,
        **both,
    }
    loaded = manifest(
        {"id": "in", "version": "1.0.0", "target": inbound, "methods": {"say": {}}},
        {"id": "out", "version": "1.0.0", "target": dial, "methods": {"say": {}}},
    )
    fleet, dialled = (plugin.target for plugin in loaded.plugins)
    assert fleet is not None and dialled is not None
    assert fleet.plugin == "in@1.0.0" and fleet.fleet_settings().balance == "round_robin"
    assert fleet.event_buffer == 1000 and fleet.connect_timeout_ms == 5_000  # defaults
    instance = fleet.instance_at(Endpoint(host="127.0.0.1", port=1, key="in#1@127.0.0.1:1"))
    assert instance.connection == "in#1@127.0.0.1:1" and instance.compress
    assert dialled.principal is None and dialled.event_buffer == 10
