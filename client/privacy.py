"""The device's side of differential privacy (`shared/privacy.py` says what each mode
trusts): Flower's own client mods, chosen per message by the run config's `dp`.

  client  `fixedclipping_mod`: the device clips its update to the norm the coordinator's
          `DifferentialPrivacyClientSideFixedClipping` sends with the round;
  local   `LocalDpMod`: the device clips its update to `dp.clip` and adds Gaussian noise of
          std σ × dp.clip, σ being the run's noise multiplier (calibrated here, on the device,
          from `dp.epsilon` when that is set: the same computation as the coordinator's).

Only train messages carry an update; the others pass untouched.
"""

from __future__ import annotations

import functools

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from client.failures import failure_reply
from shared.config import PrivacySettings
from shared.privacy import local_release_epsilon, plan_budget
from shared.run_config import RunConfig


@functools.cache
def _local_dp(settings: PrivacySettings, releases: int) -> LocalDpMod:
    sigma = plan_budget(settings, releases).noise_multiplier
    return LocalDpMod(clipping_norm=settings.dp_clip, sensitivity=2 * settings.dp_clip,
                      epsilon=local_release_epsilon(sigma, settings.dp_delta), delta=settings.dp_delta)


def device_privacy(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: the run's DP mod around a train message (a failure replies like any
    other, with a fixed category only)."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    try:
        config = RunConfig.from_flower(context.run_config)
        if config.dp.mode == "client":
            return fixedclipping_mod(msg, context, call_next)
        if config.dp.mode == "local":
            return _local_dp(config.dp, max(config.releases, 1))(msg, context, call_next)
    except Exception as error:  # noqa: BLE001  (as in client.failures: nothing of it leaves the device)
        return failure_reply(msg, error)
    return call_next(msg, context)
