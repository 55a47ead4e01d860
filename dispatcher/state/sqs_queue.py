"""The one module that imports the AWS SDK for job queues (aiobotocore, botocore), and
only when a queue is opened: a manifest without ``jobs: {backend: sqs}`` never loads it.

``SqsQueue`` is a thin adapter: one SQS client, each request bounded by ``op_timeout``,
every failure translated here into ``StateUnavailable`` (retryable: the worker loop backs
off and tries again, ``submit`` fails typed within its bound). botocore's own retries are
off, as for the Lambda provider: the bound is the dispatcher's, not the SDK's.

Credentials come from the standard AWS chain (environment, profile, instance role); no
message built here carries them (AWS's own error text is cut to 200 characters: a
signature error quotes the request it signed, never the secret key).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from dataclasses import dataclass
from typing import Any

from dispatcher.config import SqsJobsConfig
from dispatcher.state.errors import StateUnavailable

__all__ = ["Message", "SqsQueue"]

#: The most messages one ReceiveMessage returns.
RECEIVE_MAX = 10
#: The longest SQS keeps a received message invisible.
VISIBILITY_MAX_SECONDS = 43_200


@dataclass(frozen=True, slots=True)
class Message:
    message_id: str
    receipt: str
    body: str
    receives: int  # ApproximateReceiveCount: this delivery included


class SqsQueue:
    """One SQS client for a dispatcher's job queue and dead-letter queue."""

    def __init__(self, config: SqsJobsConfig) -> None:
        self.config = config
        self.op_timeout = config.op_timeout_ms / 1000
        self.where = config.endpoint_url or f"SQS {config.region or '(default region)'}"
        self._client: Any = None
        self._exits = contextlib.AsyncExitStack()
        self._errors: Any = None
        self.requests = 0
        self.failures = 0

    async def open(self) -> None:
        try:
            session_module = importlib.import_module("aiobotocore.session")
            config_module = importlib.import_module("aiobotocore.config")
            self._errors = importlib.import_module("botocore.exceptions")
        except ImportError:  # pragma: no cover - depends on the installed extras
            raise RuntimeError(
                "jobs on SQS need aiobotocore: pip install 'linchkit-dispatcher[lambda]'"
            ) from None
        config = config_module.AioConfig(
            connect_timeout=self.op_timeout,
            # A long poll answers after receive_wait_seconds: the read may take that long.
            read_timeout=self.op_timeout + self.config.receive_wait_seconds,
            retries={"max_attempts": 1, "mode": "standard"},
            max_pool_connections=64,
        )
        self._client = await self._exits.enter_async_context(
            session_module.get_session().create_client(
                "sqs",
                region_name=self.config.region,
                endpoint_url=self.config.endpoint_url,
                config=config,
            )
        )

    async def aclose(self) -> None:
        self._client = None
        exits, self._exits = self._exits, contextlib.AsyncExitStack()
        await exits.aclose()

    # -- requests ------------------------------------------------------------------------

    async def url_of(self, name: str) -> str:
        answer = await self._call("the queue's URL", "get_queue_url", extra=0, QueueName=name)
        return self._text(answer, "QueueUrl", "the queue's URL")

    async def send(self, url: str, body: str, *, group: str, dedup: str) -> str:
        """Send ``body``; on a FIFO queue in message group ``group`` (one per job: no job
        waits behind another) with deduplication id ``dedup`` (a repeat of the same send
        within SQS's 5 minutes is dropped by SQS)."""
        fifo: dict[str, Any] = {}
        if url.endswith(".fifo"):
            fifo = {"MessageGroupId": group[:128], "MessageDeduplicationId": dedup[:128]}
        answer = await self._call(
            "a job message", "send_message", QueueUrl=url, MessageBody=body, **fifo
        )
        return self._text(answer, "MessageId", "a job message")

    async def receive(self, url: str, count: int, wait: int, visibility: int) -> list[Message]:
        answer = await self._call(
            "new jobs",
            "receive_message",
            extra=wait,
            QueueUrl=url,
            MaxNumberOfMessages=max(1, min(count, RECEIVE_MAX)),
            WaitTimeSeconds=wait,
            VisibilityTimeout=visibility,
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        messages = (answer.get("Messages") or []) if isinstance(answer, dict) else None
        if not isinstance(messages, list) or not all(_is_message(m) for m in messages):
            raise self._lied("new jobs", "Messages")
        return [_message(each) for each in messages]

    async def delete(self, url: str, receipt: str) -> None:
        await self._call(
            "a job message's delete", "delete_message", QueueUrl=url, ReceiptHandle=receipt
        )

    async def hide(self, url: str, receipt: str, seconds: float) -> None:
        """Keep a received message invisible ``seconds`` more (0: visible again now)."""
        timeout = max(0, min(int(seconds + 0.999), VISIBILITY_MAX_SECONDS))
        await self._call(
            "a job's next attempt",
            "change_message_visibility",
            QueueUrl=url,
            ReceiptHandle=receipt,
            VisibilityTimeout=timeout,
        )

    async def _call(self, what: str, operation: str, extra: float = 0, **request: Any) -> Any:
        if self._client is None:
            raise StateUnavailable(f"the SQS job queue is not open for {what}")
        self.requests += 1
        bound = self.op_timeout + extra
        try:
            async with asyncio.timeout(bound):
                return await getattr(self._client, operation)(**request)
        except TimeoutError:
            reason = f"no answer within {bound * 1000:.0f} ms"
        except self._errors.ClientError as error:
            reason = _client_error(error)
        except Exception as error:
            # A peer that lies (an unparsable answer raises botocore's ResponseParserError,
            # which is no BotoCoreError) must not end a worker: it is one more failure.
            reason = f"{type(error).__name__}: {str(error)[:200]}"
        self.failures += 1
        raise StateUnavailable(
            f"job queue {self.where} unavailable for {what}: {reason}",
            details={"stage": "jobs"},
        )

    def _text(self, answer: Any, field: str, what: str) -> str:
        value = answer.get(field) if isinstance(answer, dict) else None
        if not isinstance(value, str) or not value:
            raise self._lied(what, field)
        return value

    def _lied(self, what: str, field: str) -> StateUnavailable:
        self.failures += 1
        return StateUnavailable(
            f"job queue {self.where} answered {what} without a usable {field}: not SQS, "
            "or a proxy in the way",
            details={"stage": "jobs"},
        )

    def __repr__(self) -> str:
        return f"<SqsQueue {self.where} requests={self.requests} failures={self.failures}>"


def _client_error(error: Any) -> str:
    answer = error.response.get("Error", {})
    code = str(answer.get("Code", "Unknown"))
    message = str(answer.get("Message", ""))[:200]
    if "NonExistentQueue" in code or code == "QueueDoesNotExist":
        return f"the queue does not exist ({code}); create it or fix jobs.sqs"
    return f"{code}: {message}"


def _is_message(answer: object) -> bool:
    return isinstance(answer, dict) and all(
        isinstance(answer.get(field), str) and answer[field]
        for field in ("MessageId", "ReceiptHandle")
    )


def _message(answer: dict[str, Any]) -> Message:
    attributes = answer.get("Attributes")
    count = attributes.get("ApproximateReceiveCount") if isinstance(attributes, dict) else None
    try:
        receives = int(count or 1)
    except (TypeError, ValueError):
        receives = 1
    body = answer.get("Body")
    return Message(
        message_id=answer["MessageId"],
        receipt=answer["ReceiptHandle"],
        body=body if isinstance(body, str) else "",
        receives=max(1, receives),
    )
