"""Bridges to other training frameworks (each an optional extra; nothing else in pact imports them)."""
