"""The admin API's one refusal type, in a module of its own so every handler module can raise it."""

from __future__ import annotations


class ApiError(Exception):
    """A refusal, answered as ``{"error": ..., "detail": [...]}`` with ``status``."""

    def __init__(
        self, status: int, error: str, detail: list[str] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail or []
        self.headers = headers or {}
