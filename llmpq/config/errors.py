"""The one error type for bad configuration: it names the file and the key at fault."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range.

    `file` is the config file (or "overrides") and `key` the dotted key at fault.
    """

    def __init__(self, file: str, key: str, message: str):
        self.file = file
        self.key = key
        self.message = message
        super().__init__(f"{file}: {key}: {message}")
