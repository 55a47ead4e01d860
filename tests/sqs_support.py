"""moto's server as a process (``tests/moto_sqs_server.py``: with a race that lost
messages fixed), for the SQS job tests: ``stop`` SIGKILLs it (an SQS that
vanishes mid-run) and ``start`` brings it back on the same port (empty, as moto keeps
nothing: the test creates its queues again). Real HTTP, real aiobotocore; nothing mocked.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.services import CLEAN_ENVIRONMENT, free_port

#: moto_server, with a race of its SQS that loses messages fixed (see the module).
MOTO_SERVER = [sys.executable, str(Path(__file__).with_name("moto_sqs_server.py"))]
START_TIMEOUT = 60.0
REGION = "us-east-1"
#: moto takes any key; a distinctive secret lets the tests look for it in logs and errors.
SECRET = "sqs-test-secret-Zq8vT3kLw9"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_DEFAULT_REGION": REGION,
}


class Moto:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = folder / f"moto-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(
                [*MOTO_SERVER, "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**CLEAN_ENVIRONMENT, **CREDENTIALS},
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"moto_server exited:\n{self._log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        pytest.fail(f"moto_server did not listen within {START_TIMEOUT:g} s")

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None

    def client(self) -> Any:
        return boto3.client(
            "sqs",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=SECRET,
        )


class Queues:
    """A job queue and its dead-letter queue, named for one test."""

    def __init__(self, moto: Moto, *, fifo: bool = False) -> None:
        self.moto = moto
        tag = uuid.uuid4().hex[:12]
        suffix = ".fifo" if fifo else ""
        self.name = f"jobs-{tag}{suffix}"
        self.dead_name = f"jobs-{tag}-dead{suffix}"
        self.attributes = {"FifoQueue": "true"} if fifo else {}
        self.create()

    def create(self) -> None:
        client = self.moto.client()
        for attribute, name in (("url", self.name), ("dead_url", self.dead_name)):
            answer = client.create_queue(QueueName=name, Attributes=self.attributes)
            setattr(self, attribute, answer["QueueUrl"])

    def bodies(self, url: str) -> list[str]:
        """Every message body now visible on ``url``, left visible again."""
        client, receipts, bodies = self.moto.client(), {}, []
        for _ in range(100):
            answer = client.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=30
            )
            fresh = [m for m in answer.get("Messages", []) if m["MessageId"] not in receipts]
            if not fresh:
                break
            for message in fresh:
                receipts[message["MessageId"]] = message["ReceiptHandle"]
                bodies.append(message["Body"])
        for receipt in receipts.values():
            client.change_message_visibility(
                QueueUrl=url, ReceiptHandle=receipt, VisibilityTimeout=0
            )
        return bodies

    def count(self, url: str) -> int:
        """Messages visible or in flight on ``url``."""
        attributes = self.moto.client().get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return sum(int(value) for value in attributes.values())


def _running(folder: Path) -> Iterator[Moto]:
    moto = Moto(folder)
    moto.start()
    try:
        yield moto
    finally:
        moto.stop()


@pytest.fixture(scope="session")
def sqs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    """One moto_server process for the session; each test has its own queues."""
    yield from _running(tmp_path_factory.mktemp("moto-sqs"))


@pytest.fixture
def own_sqs_server(tmp_path: Path) -> Iterator[Moto]:
    """A moto_server of this test's own, which it may kill and start again."""
    yield from _running(tmp_path)


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return CREDENTIALS
