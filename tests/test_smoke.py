from dispatcher import Dispatcher
from tests.conftest import LOCAL_TARGET, echo_plugin, manifest


async def test_local_and_http_plugins_answer_the_same(echo_url: str) -> None:
    plugins = manifest(
        echo_plugin("local", LOCAL_TARGET),
        echo_plugin("remote", {"provider": "http", "url": echo_url}),
    )
    async with Dispatcher(plugins) as dispatcher:
        local = await dispatcher.call("local", "say", {"text": "hi"}, caller="alice")
        remote = await dispatcher.call("remote", "say", {"text": "hi"}, caller="alice")
    assert local == {"text": "hi", "greeting": "from local", "caller": "alice"}
    assert remote == {"text": "hi", "greeting": "from http", "caller": "alice"}
