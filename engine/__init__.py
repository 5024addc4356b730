"""Helpline: customer-support conversations as YAML state machines."""

__version__ = "0.1.0"
