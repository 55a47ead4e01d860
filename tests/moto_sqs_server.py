"""moto's server (``moto_server``'s own command line), with a race of its SQS fixed:
``python tests/moto_sqs_server.py -H 127.0.0.1 -p PORT``.

moto (5.2.6) serves each request on a thread of its own. ``Queue.delete_message`` rebuilds
the queue's message list without the queue's lock and puts the new list in place of the old,
while ``Queue.add_message`` appends under that lock: a message sent while another is being
deleted can be appended to the old list just before it is replaced, and is gone — sent,
answered a ``MessageId``, and never delivered. SQS does not lose a sent message; the job
tests assert that no job is lost, so their SQS must not either. Deleting under the lock
(a ``threading.Condition`` over an ``RLock``, which ``add_message`` and the long poll's wait
already use) makes the two exclusive.
"""

from __future__ import annotations

import functools

from moto.server import main
from moto.sqs.models import Queue

_unlocked_delete = Queue.delete_message


@functools.wraps(_unlocked_delete)
def _delete_message(self: Queue, receipt_handle: str) -> None:
    with self._messages_lock:
        _unlocked_delete(self, receipt_handle)


if __name__ == "__main__":
    Queue.delete_message = _delete_message  # type: ignore[method-assign]
    main()
