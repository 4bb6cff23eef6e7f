"""One DynamoDB request at a time in moto's threaded server.

moto_server runs werkzeug with ``threaded=True``, but its DynamoDB backend is not safe under
concurrent requests:

* TransactWriteItems takes a deep copy of every table it touches before its first write and,
  when any condition fails, puts those copies back. A write that another request made in the
  meantime is silently undone. Twenty racing budget reservations (each a two-item
  transaction conditioned on a version) admitted one hold too many: a losing transaction
  restored a table copied before the winner's write, erasing the winner's hold.
* conditional PutItem / UpdateItem / DeleteItem check the condition and then write, as two
  steps, so two requests can both pass a check only one of them should.

Real DynamoDB makes every single-item write and every transaction atomic, and the adapters'
contracts (claims, budget holds, batch items, generation rows) test exactly that. This patch
serializes DynamoDB requests behind one lock, which gives the same guarantees. Only DynamoDB
is serialized: an SQS long poll or an S3 upload still runs beside it.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

from moto.dynamodb.responses import DynamoHandler

# Re-entrant, so a handler that calls another handler method cannot deadlock itself.
DYNAMODB_LOCK = threading.RLock()


def _serialized(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def call_action(self: DynamoHandler) -> Any:
        with DYNAMODB_LOCK:
            return original(self)

    call_action.sightline_serialized = True  # type: ignore[attr-defined]
    return call_action


def install() -> None:
    """Serialize moto's DynamoDB request handling (idempotent)."""
    if getattr(DynamoHandler.call_action, "sightline_serialized", False):
        return
    DynamoHandler.call_action = _serialized(DynamoHandler.call_action)
