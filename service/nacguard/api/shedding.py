"""Overload shedding in the HTTP protocol: a ``/predict`` or v2 infer request that the service
is too full to take is refused as soon as its headers are parsed, before any ASGI work.

The request middleware sheds these routes too (before routing), but by then uvicorn has built
the request's scope, started an ASGI task and passed it through the framework's outer layers,
and the refusal goes back out through them: 0.076-0.085 ms of server CPU per refusal on the
2-core benchmark machine, against 0.024-0.026 ms here (``loadtest/refusal_bench.py``). Here a
refusal is the capacity check and one socket write of a response rendered once: the body and
headers are those of the app's one exception handler
(:func:`~nacguard.api.errors.error_response`), for ``/predict`` and in the v2 shape alike. The
refused request's body is read and dropped as it arrives, and the connection stays open for the
client's next request.

What a refusal still does as in the middleware: the ``X-Request-ID`` (the client's, or a new one),
``Retry-After``, the rejection and request metrics (``endpoint="other"``, as for every request
shed before routing), and the access-log line when its level is enabled. What is left to the
middleware: requests pipelined behind an unfinished one on the same connection (their answer
must wait its turn), and everything when the app runs under another ASGI server.
"""

from __future__ import annotations

import time
import urllib.parse
from http import HTTPStatus

import httptools
from starlette.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from nacguard.errors import Overloaded
from nacguard.openinference.errors import is_v2_path
from nacguard.serving import Service
from nacguard.serving.admission import Priority

from .errors import error_parts
from .logs import request_id_var
from .middleware import REQUEST_ID_HEADER, SHED_PATHS, access_log, request_context

__all__ = ["Shedder", "shedding_protocol"]

Headers = list[tuple[bytes, bytes]]
_REQUEST_ID = REQUEST_ID_HEADER.lower().encode()


class Shedder:
    """Decides, from a request's method, path and headers, whether it is refused now, and
    renders the refusal.

    Args:
        service: the service whose capacity bound (:meth:`Service.check_capacity`) decides.
    """

    def __init__(self, service: Service) -> None:
        self.service = service
        # The refusal's status line, headers and body per shape (/predict, v2), rendered once:
        # its message and Retry-After do not depend on the request.
        self._rendered: dict[bool, tuple[int, bytes, bytes]] = {}

    def refusal(
        self, path: str, headers: Headers, default_headers: Headers
    ) -> tuple[bytes, int, str] | None:
        """The response to write, its status and request id, when this ``POST`` must be refused
        now; ``None`` when it goes on to the app: not a shed route, room for it, not ready, or a bad
        ``X-Priority`` (which the route answers with 422).

        Args:
            path: the request's path, as in the ASGI scope.
            headers: its headers, names lower-cased.
            default_headers: the server's own headers for every response (``date``).
        """
        service = self.service
        if not SHED_PATHS.match(path) or not service.ready:
            return None
        try:
            # Room even for low priority (the lowest bound): every request gets in, and its
            # headers need no reading here (the request middleware reads them).
            service.check_capacity(Priority.LOW)
            return None
        except Overloaded:
            pass
        request_id, priority = request_context(headers)
        if priority is None:
            return None
        try:
            service.check_capacity(priority)
        except Overloaded as exc:
            v2 = is_v2_path(path)
            rendered = self._rendered.get(v2)
            if rendered is None:
                rendered = self._rendered[v2] = _render(path, exc)
            status, head, body = rendered
            if service.metrics is not None:
                service.metrics.reject("queue_full")
            parts = [head]
            parts.extend(b"%s: %s\r\n" % pair for pair in default_headers)
            parts.append(b"%s: %s\r\n\r\n" % (_REQUEST_ID, request_id.encode()))
            parts.append(body)
            return b"".join(parts), status, request_id
        return None

    def finish(self, path: str, status: int, request_id: str, started: float) -> None:
        """Count and log one refusal, as the request middleware does for every request."""
        seconds = time.perf_counter() - started
        metrics = self.service.metrics
        if metrics is not None:
            metrics.observe_request("other", "POST", status, seconds)
        token = request_id_var.set(request_id)
        try:
            access_log("POST", path, status, seconds)
        finally:
            request_id_var.reset(token)


def _render(path: str, exc: Overloaded) -> tuple[int, bytes, bytes]:
    """The status, the status line with the headers, and the body of the app's error response
    for ``exc`` on ``path`` (:meth:`Shedder.refusal` adds the per-request headers)."""
    status, headers, body, _ = error_parts(exc, path)
    response = JSONResponse(body, status_code=status, headers=headers)
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())]
    lines.extend(b"%s: %s\r\n" % pair for pair in response.raw_headers)
    return status, b"".join(lines), bytes(response.body)


def shedding_protocol(shedder: Shedder) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, refusing with ``shedder`` as soon as a request's headers
    are parsed (see the module docstring); for ``uvicorn.Config(http=...)``."""

    class SheddingProtocol(HttpToolsProtocol):
        # The refused request's path, status, request id, and when the refusal began.
        _refused: tuple[str, int, str, float] | None = None

        def on_message_begin(self) -> None:
            # A request parsed right behind a refused one, from the same read: the refusal's
            # end armed the idle timer, but the connection is not idle.
            self._unset_keepalive_if_required()
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            started = time.perf_counter()
            previous = self.cycle
            idle = previous is None or previous.response_complete  # nothing pipelined ahead
            post = self.parser.get_method() == b"POST"
            if idle and post and not self.parser.should_upgrade():
                path = _path(self.url, self.root_path)
                answer = shedder.refusal(path, self.headers, self.server_state.default_headers)
                if answer is not None:
                    data, status, request_id = answer
                    self._refused = (path, status, request_id, started)
                    if self.expect_100_continue:
                        # The client holds its body back until told to send it: it will not
                        # come, and the connection cannot carry another request.
                        head, body = data.split(b"\r\n\r\n", 1)
                        self.transport.write(head + b"\r\nconnection: close\r\n\r\n" + body)
                        self.transport.close()  # connection_lost counts it
                    else:
                        self.transport.write(data)
                    return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if self._refused is None:
                super().on_body(body)  # a refused request's body is dropped as it arrives

        def on_message_complete(self) -> None:
            if self._refused is None:
                super().on_message_complete()
                return
            self._end_refusal()
            if self.parser.should_keep_alive():
                self.on_response_complete()  # ready for the connection's next request
            else:
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._end_refusal()  # the client left while its refused body was arriving
            super().connection_lost(exc)

        def _end_refusal(self) -> None:
            if self._refused is not None:
                shedder.finish(*self._refused)
                self._refused = None

    return SheddingProtocol


def _path(url: bytes, root_path: str) -> str:
    """The request's path as uvicorn puts it in the scope."""
    path: str = httptools.parse_url(url).path.decode("ascii")
    if "%" in path:
        path = urllib.parse.unquote(path)
    return root_path + path
