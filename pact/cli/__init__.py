"""The command lines, `pact` and `pact-cache`: one module per command, a thin layer over the Python API, with flags
generated from the settings dataclasses."""
