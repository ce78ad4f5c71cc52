"""The one exception type of the data package."""

from __future__ import annotations


class DataError(ValueError):
    """A data file is missing, malformed or does not match its checksum.

    The message is always one line naming the file, what was expected and what was found, so the
    CLI can print it as is.
    """

    def __init__(self, message: str) -> None:
        # Embedded messages (PIL, zlib, pickle) may span lines; the contract is one line.
        super().__init__(" ".join(str(message).split()))
