"""Why a change to the switch state was refused; the state is untouched whenever one is raised."""

from __future__ import annotations


class SwitchError(ValueError):
    """A refused change; the message is shown to API users. The state is untouched."""


class VersionConflict(SwitchError):
    """If-Match/expected_version was stale."""

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"version conflict: expected version {expected}, current version is {current}")
        self.expected = expected
        self.current = current
