"""Request bodies as strict JSON: NaN, Infinity and numbers that overflow to infinity
(1e999) are not JSON, though Python's json module reads them. Every JSON route's body goes
through here, fields typed Any or dict included, and such a body is a 400
("the request body is not valid JSON: ...") in the route's own error shape."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

_NOT_FINITE = "NaN and Infinity are not JSON numbers"


def _constant(name: str) -> Any:
    raise ValueError(f"{_NOT_FINITE} ({name})")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{_NOT_FINITE} ({text} overflows a double)")
    return value


def loads_strict(body: bytes | str) -> Any:
    """json.loads without NaN/Infinity; raises json.JSONDecodeError like a syntax error."""
    doc = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        return json.loads(body, parse_constant=_constant, parse_float=_float)
    except ValueError as e:
        if isinstance(e, json.JSONDecodeError):
            raise
        raise json.JSONDecodeError(str(e), doc, 0) from None


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_strict(await self.body())
        return self._json


def strict_request(request: Request) -> StrictJSONRequest:
    """The request as a StrictJSONRequest. A subclass route that reads the body again after the
    handler (TEI's error shape) must call this first and pass the same object on: the body is
    read from the connection once, and cached on the object that read it."""
    if isinstance(request, StrictJSONRequest):
        return request
    return StrictJSONRequest(request.scope, request.receive)


class StrictJSONRoute(APIRoute):
    """FastAPI reads a JSON body with request.json(): this route's request reads it strictly."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(strict_request(request))

        return strict_handler
