"""The HTTP/1 protocol every service serves with: Sanic's, refusing at once a connection whose
first bytes cannot begin a request line (a TLS or SSH client, binary noise) with a 400 and a
close. Sanic would wait for the end of a head that never comes, holding the connection until
the request timeout."""

from __future__ import annotations

import re

from sanic.http.constants import Stage
from sanic.server.protocols.http_protocol import HttpProtocol

from engine.errors import InvalidRequest

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(_TOKEN + rb" [^\x00-\x20\x7f]+ HTTP/[0-9]\.[0-9]\r?")
# What a request line may look like while its end has not arrived yet.
_REQUEST_LINE_START = re.compile(_TOKEN + rb"( [^\x00-\x20\x7f]*( [HTP/0-9.]*\r?)?)?")
_PROBE_BYTES = 16 * 1024  # a request line longer than this is Sanic's to refuse (431)


def cannot_be_http(buffer: bytes | bytearray) -> bool:
    """Do these first bytes of a request rule out an HTTP/1 request line?"""
    head = bytes(buffer[:_PROBE_BYTES]).lstrip(b"\r\n")
    line, newline, _ = head.partition(b"\n")
    if not line:
        return False
    pattern = _REQUEST_LINE if newline else _REQUEST_LINE_START
    return pattern.fullmatch(line) is None


class HttpOnlyProtocol(HttpProtocol):
    async def receive_more(self) -> None:
        """Sanic waits here for the rest of a request's head: bytes that cannot begin one are
        refused first (a 400 the framework writes, then the connection closes)."""
        self._refuse_what_is_not_http()
        await super().receive_more()
        self._refuse_what_is_not_http()

    def _refuse_what_is_not_http(self) -> None:
        http = getattr(self, "_http", None)
        reading_head = http is not None and http.request is None and http.stage is Stage.REQUEST
        if reading_head and cannot_be_http(self.recv_buffer):
            raise InvalidRequest(
                "The connection did not begin with an HTTP/1 request line", code="not_http"
            )
