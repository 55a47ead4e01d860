"""gRPC server reflection in every SDK's server (docs/grpc-and-subprocess.md, "Server
reflection").

The example plugin in service mode answers ``grpc.reflection.v1`` and ``v1alpha``, so
``grpcurl list`` and ``grpcurl describe`` work against it: the listing names the plugin
service and health, and the plugin service's file descriptor carries its RPCs and messages.
Reflection stays open when a token guards the plugin service, like health: it tells only the
schema, which ``proto/plugin.proto`` publishes anyway. A subprocess plugin serves it too,
to the one host that AutoMTLS admits.

The client is grpcio-reflection's v1alpha stubs; v1 is the same messages on another path,
called here through the channel directly.
"""

from __future__ import annotations

import secrets
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dispatcher import Dispatcher, parse_manifest
from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
from tests.conformance.conftest import LANGUAGES, START_TIMEOUT, executable
from tests.conformance.test_token import _service
from tests.conftest import ROOT

pytestmark = pytest.mark.parametrize("language", LANGUAGES)

PLUGIN_SERVICE = "linchkit.plugin.v1.PluginService"
HEALTH_SERVICE = "grpc.health.v1.Health"
VERSIONS = ("v1alpha", "v1")
RPCS = {
    # name: (client streaming, server streaming)
    "Describe": (False, False),
    "Init": (False, False),
    "Start": (False, False),
    "Stop": (False, False),
    "Destroy": (False, False),
    "Call": (False, False),
    "CallBatch": (False, False),
    "CallStream": (False, True),
    "Events": (True, True),
}


async def _ask(
    channel: grpc.aio.Channel, version: str, *requests: Any
) -> list[reflection_pb2.ServerReflectionResponse]:
    """One ``ServerReflectionInfo`` stream over ``version``: the answers to ``requests``."""
    if version == "v1alpha":
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
    else:  # v1's messages are v1alpha's, field for field
        stream = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
    call = stream(iter(requests), timeout=10)
    answers = [answer async for answer in call]
    assert len(answers) == len(requests), answers
    for answer in answers:
        assert not answer.HasField("error_response"), answer.error_response
    return answers


async def _list(channel: grpc.aio.Channel, version: str) -> set[str]:
    (answer,) = await _ask(
        channel, version, reflection_pb2.ServerReflectionRequest(list_services="")
    )
    return {service.name for service in answer.list_services_response.service}


async def _files(
    channel: grpc.aio.Channel, version: str, symbol: str
) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """The file that defines ``symbol`` (and any it imports), by name."""
    (answer,) = await _ask(
        channel, version, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    )
    files = {}
    for data in answer.file_descriptor_response.file_descriptor_proto:
        file = descriptor_pb2.FileDescriptorProto.FromString(data)
        files[file.name] = file
    # Valid descriptors, as grpcurl needs them to describe anything: they build a pool
    # (map entries named as protoc names them, type names that resolve, …).
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name not in added:
            added.add(name)
            for dependency in files[name].dependency:
                add(dependency)
            pool.Add(files[name])

    for name in files:
        add(name)
    try:
        pool.FindFileContainingSymbol(symbol)
    except KeyError:  # the pool finds no method by its full name: look in its service
        service, _, method = symbol.rpartition(".")
        assert method in pool.FindServiceByName(service).methods_by_name, symbol
    for file in files.values():
        _check_map_entries(file.message_type)
    return files


def _check_map_entries(messages: Any) -> None:
    """A map field's entry type is named as protoc names it (``statuses`` →
    ``StatusesEntry``): Go's protobuf, under grpcurl, refuses the file otherwise."""
    for message in messages:
        entries = {nested.name for nested in message.nested_type if nested.options.map_entry}
        for field in message.field:
            entry = field.type_name.rsplit(".", 1)[-1]
            if entry in entries:
                words = field.name.split("_")
                expected = "".join(word[:1].upper() + word[1:] for word in words) + "Entry"
                assert entry == expected, (message.name, field.name, entry)
        _check_map_entries(message.nested_type)


def _check_plugin_file(files: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    (file,) = [f for f in files.values() if f.package == "linchkit.plugin.v1"]
    (service,) = [s for s in file.service if s.name == "PluginService"]
    methods = {m.name: m for m in service.method}
    assert set(methods) == set(RPCS)
    for name, (client_streaming, server_streaming) in RPCS.items():
        method = methods[name]
        assert (method.client_streaming, method.server_streaming) == (
            client_streaming,
            server_streaming,
        ), name
    assert methods["Call"].input_type == ".linchkit.plugin.v1.CallRequest"
    assert methods["Call"].output_type == ".linchkit.plugin.v1.CallReply"
    # The messages come along, field for field as the proto has them.
    messages = {m.name: m for m in file.message_type}
    expected = plugin_pb2.CallRequest.DESCRIPTOR
    assert [(f.name, f.number) for f in messages["CallRequest"].field] == [
        (f.name, f.number) for f in expected.fields
    ]
    assert {"PluginInfo", "CallReply", "StreamItem", "HostEvent", "PluginEvent"} <= set(messages)


async def _check_reflection(channel: grpc.aio.Channel) -> None:
    for version in VERSIONS:
        services = await _list(channel, version)
        assert {PLUGIN_SERVICE, HEALTH_SERVICE} <= services, (version, services)
        _check_plugin_file(await _files(channel, version, PLUGIN_SERVICE))
        # A method and a message resolve to the same file (grpcurl describe of either).
        _check_plugin_file(await _files(channel, version, f"{PLUGIN_SERVICE}.CallStream"))
        _check_plugin_file(await _files(channel, version, "linchkit.plugin.v1.CallRequest"))
        health = await _files(channel, version, HEALTH_SERVICE)
        assert any(
            s.name == "Health"
            for f in health.values()
            if f.package == "grpc.health.v1"
            for s in f.service
        ), health


async def test_reflection_lists_and_describes_the_plugin_service(language: str) -> None:
    async with (
        _service(language) as service,
        grpc.aio.insecure_channel(service.address) as channel,
    ):
        await _check_reflection(channel)
        # An unknown symbol: NOT_FOUND, as an error answer (most libraries) or as the
        # stream's status (tonic-reflection); grpcurl reads either.
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="linchkit.plugin.v1.NoSuchThing"
                    )
                ]
            ),
            timeout=10,
        )
        try:
            (answer,) = [a async for a in call]
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
        else:
            assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_reflection_stays_open_behind_a_token(language: str) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    async with _service(language, LINCHKIT_PLUGIN_TOKEN=token) as service:
        async with grpc.aio.insecure_channel(service.address) as channel:
            await _check_reflection(channel)
            # ... while the plugin service itself still wants the token.
            stub = plugin_pb2_grpc.PluginServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Describe(plugin_pb2.DescribeRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stderr = await service.stop()
    assert token not in stderr


async def test_a_subprocess_plugin_serves_reflection_to_its_host(language: str) -> None:
    """Over the host's own AutoMTLS channel, the only one a subprocess plugin admits."""
    target = {
        "provider": "subprocess",
        "command": [str(executable(language))],
        "handshake_timeout_ms": int(START_TIMEOUT * 1000),
        "health_interval_ms": 0,
        # The Python plugin imports the SDK under test, not an installed one, when the
        # tests run with PYTHONPATH pointing at this checkout.
        "inherit_env": ["PYTHONPATH"],
    }
    manifest = parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": "example",
                    "version": "1.0.0",
                    "target": target,
                    "lifecycle": {"init_timeout_ms": int(START_TIMEOUT * 1000)},
                    "defaults": {"timeout_ms": 10_000},
                    "methods": {"echo": {}},
                }
            ],
        },
        base_dir=ROOT,
    )
    async with Dispatcher(manifest) as dispatcher:
        assert await dispatcher.call("example", "echo", "hi") == "hi"
        plugin_target = dispatcher.manifest.plugins[0].target
        provider: Any = dispatcher.providers[plugin_target.provider]
        process = provider.process("example", "1.0.0", plugin_target)
        channel = process._child.connection._channel
        await _check_reflection(channel)
