"""Errors of the production model layer.

:class:`ModelBusyError` is a :class:`~engine.errors.ModelUnavailableError` (code that
only knows the base error still treats it as "the model could not answer"), but the
layer never retries it or falls back on it: a full queue means *this process* is
saturated, so the runner answers the customer with a short "busy" notice and retries
the whole turn a little later instead.
"""

from __future__ import annotations

from engine.errors import ModelUnavailableError

__all__ = ["ModelBusyError", "busy_notice", "policy_reply"]


class ModelBusyError(ModelUnavailableError):
    """No model-call slot became free within the queue bound (count or wait time)."""

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"model {self.model!r} is busy: {self.reason}"


_BUSY = {
    "en": "We're very busy right now. I've got your message and will answer in a moment.",
    "zh": "当前咨询人数较多，已收到您的消息，请稍候，马上为您回复。",
}
_POLICY = {
    "en": "Sorry, I can't help with that here. If you need help with an order, a delivery "
          "or a refund, just tell me.",
    "zh": "抱歉，这个问题我无法在这里处理。如需订单、物流或退款方面的帮助，请告诉我。",
}


def busy_notice(language: str) -> str:
    """The transient notice a customer gets when the turn waits for a free model slot."""
    return _BUSY["zh" if language == "zh" else "en"]


def policy_reply(language: str) -> str:
    """The safe reply sent instead of a decision when the content classifier refuses."""
    return _POLICY["zh" if language == "zh" else "en"]
