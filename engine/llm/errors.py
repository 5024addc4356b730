"""Errors of the production model layer.

:class:`ModelBusyError` is a :class:`~engine.errors.ModelUnavailableError` (code that
only knows the base error still treats it as "the model could not answer"), but the
layer never retries it or falls back on it: a full queue means *this process* is
saturated, so the runner answers the customer with a short "busy" notice and retries
the whole turn a little later instead.
"""

from __future__ import annotations

from engine.errors import ModelUnavailableError

__all__ = ["ModelBusyError"]


class ModelBusyError(ModelUnavailableError):
    """No model-call slot became free within the queue bound (count or wait time)."""

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"model {self.model!r} is busy: {self.reason}"
