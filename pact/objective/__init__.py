"""The objectives: their settings, their math (PACT's safety-token KL, the token-wise loss), the student's forward,
the targets a batch is filled with (cached or online, one interface), the reference pass and the safety tokens.
Above `pact.data` and `pact.models`; `pact.cache_tools` stores what this layer computes."""

import warnings

from pact.objective import settings

_RENAMED = {"PactArguments": "ObjectiveArguments", "PactConfig": "ObjectiveArguments"}


def __getattr__(name: str):
    """The objective settings' former names, kept importable for one release with a `DeprecationWarning`."""
    if name in _RENAMED:
        warnings.warn(f"pact.objective.{name} is now pact.ObjectiveArguments (pact.objective.settings.{_RENAMED[name]}); "
                      f"the old name goes in the next release", DeprecationWarning, stacklevel=2)
        return getattr(settings, _RENAMED[name])
    raise AttributeError(f"module 'pact.objective' has no attribute {name!r}")
