"""The privacy step of the turn pipeline: redact before the model, restore after.

Customer text is redacted (stable placeholders per conversation) before any
model call or log line; the placeholder vault is kept with the conversation
(``results["_pii"]``) so placeholders stay stable across turns and the engine
can restore real values where it needs them (entity values, e.g. an email
for an action). Model replies are filtered for links and contact details
before they reach the customer.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from engine.safety.output_filter import filter_output
from engine.safety.redaction import PiiVault, Redactor, VaultFormatError
from engine.store.base import ConversationState

__all__ = ["Privacy"]

_VAULT_KEY = "_pii"


class Privacy:
    """Redaction and output filtering bound to conversations (see the module docstring)."""

    def __init__(self, redactor: Redactor | None = None, *,
                 allowed_domains: Collection[str] = ()) -> None:
        self.redactor = redactor or Redactor()
        self.allowed_domains = tuple(allowed_domains)

    @staticmethod
    def vault(conv: ConversationState) -> PiiVault:
        raw = conv.results.get(_VAULT_KEY)
        if isinstance(raw, str):
            try:
                return PiiVault.from_json(raw)
            except VaultFormatError:
                pass  # a damaged vault only costs placeholder stability
        return PiiVault()

    def redact(self, text: str, conv: ConversationState) -> str:
        """The text a model may see; records new placeholders in the conversation."""
        vault = self.vault(conv)
        before = len(vault)
        redacted = self.redactor.redact(text, vault)
        if len(vault) != before:
            conv.results[_VAULT_KEY] = vault.to_json()
        return redacted.text

    def restore_entities(self, entities: Mapping[str, Any],
                         conv: ConversationState) -> dict[str, Any]:
        """Entity values with placeholders the model echoed replaced by the real values."""
        if _VAULT_KEY not in conv.results:
            return dict(entities)
        vault = self.vault(conv)
        return {k: vault.restore(v, mask=()) if isinstance(v, str) else v
                for k, v in entities.items()}

    def filter_reply(self, text: str, conv: ConversationState) -> str:
        """A model reply made safe to send: no foreign links or contact details."""
        vault = self.vault(conv) if _VAULT_KEY in conv.results else None
        return filter_output(text, vault=vault, allowed_domains=self.allowed_domains).text
