"""Bodies of the live-change calls: pool membership and config reload (models as in admin.models)."""

from __future__ import annotations

from pydantic import Field

from ..core.colors import Color
from .models import Reason, _Model


class UpstreamRequest(_Model):
    """Body of POST /v1/pools/{color}/upstreams."""

    upstream: str = Field(description="host:port, IPv6 in brackets; probed before it takes traffic.")
    reason: Reason | None = None
    force: bool = Field(default=False, description="Add it even if it does not answer the probe.")


class UpstreamsRequest(_Model):
    """Body of PUT /v1/pools/{color}/upstreams: the whole list, in order."""

    upstreams: list[str] = Field(description="host:port each; new ones are probed first.")
    reason: Reason | None = None
    force: bool = Field(
        default=False,
        description="Apply even if a new one fails the probe or the list leaves a live color empty.",
    )


class RemoveRequest(_Model):
    """Optional body of DELETE /v1/pools/{color}/upstreams/{upstream}."""

    reason: Reason | None = None
    force: bool = Field(default=False, description="Remove even the last upstream of a color with weight.")


class MembershipView(_Model):
    """A color's upstreams after a call, and what the call changed."""

    color: Color
    upstreams: list[str]
    added: list[str]
    removed: list[str]
    version: int = Field(description="The switch state version (membership changes count too).")
