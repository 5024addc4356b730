"""The production model layer: cache, coalescing, batching, limits, resilience, safety.

Every layer is a :class:`~engine.models.base.Model` wrapping another one; they are
composed in :func:`engine.llm.stack.build_model_stack`. See ``docs/model-layer.md``.
"""

from engine.llm.errors import ModelBusyError

__all__ = ["ModelBusyError"]
