"""What a device sends up when it fails: a fixed code and category, never the error's text.

Flower turns an exception raised in a ClientApp into an error reply carrying
`str(exception)`, and this project's errors name what a user can fix: a store's folder (often
named after its user), a line of a data file, a path. None of that may leave the device. So
every ClientApp handler is wrapped: an exception becomes Flower's error reply with one of the
codes below and a reason made of fixed words only; the details go to the device's own log.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from flwr.app import Context, Error, Message

from shared.errors import AdapterLoadError, ModelLoadError
from shared.expert_package import ExpertDigestError
from shared.settings import SettingError
from shared.user_store import DataError

log = logging.getLogger(__name__)

# Category -> error code of the reply (Flower's own codes are small integers; ours start at 1000).
FAILURE_CODES = {
    "user-store": 1001,  # the user's store is missing or malformed
    "run-config": 1002,  # a run config value this device cannot use
    "base-model": 1003,  # the base model cannot be loaded here
    "expert": 1004,  # the expert is not cached, fails its digest, or does not fit the base
    "input": 1005,  # any other value this device refused
    "storage": 1006,  # the device's disk: a path, a permission, a full disk
    "internal": 1099,  # a bug
}


def failure_category(error: BaseException) -> str:
    if isinstance(error, DataError):
        return "user-store"
    if isinstance(error, SettingError):
        return "run-config"
    if isinstance(error, ModelLoadError):
        return "base-model"
    if isinstance(error, ExpertDigestError | AdapterLoadError):
        return "expert"
    if isinstance(error, ValueError):
        return "input"
    if isinstance(error, OSError):
        return "storage"
    return "internal"


def failure_reply(message: Message, error: BaseException) -> Message:
    """Flower's error reply to `message`, holding only a fixed code and category; the error
    itself is logged here, on the device."""
    category = failure_category(error)
    log.error("%s message failed (%s); the coordinator is told the category only", message.metadata.message_type,
              category, exc_info=error)
    if category in ("expert", "internal"):  # the resident base may hold a half-loaded adapter
        from client.federated import forget_resident_device

        forget_resident_device()
    reason = f"device failed: {category} (details in the device's log)"
    return Message(Error(code=FAILURE_CODES[category], reason=reason), reply_to=message)


def replies_without_details(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Wrap a ClientApp handler so that whatever it raises leaves the device as `failure_reply`."""

    @functools.wraps(handler)
    def handle(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as error:  # noqa: BLE001  (every failure, ours or the user's, stays on the device)
            return failure_reply(message, error)

    return handle
