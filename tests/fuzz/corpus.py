"""The hostile corpus: byte sequences a client (or something that is not one) may send, each
with the answer every service owes it. `{target}` is the service's route and `{body}` a body it
would accept, so each entry is replayed against all three."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hostile:
    name: str
    request: bytes  # the whole request, as sent on the socket
    status: int
    code: str | None = None


NOT_HTTP = "not_http"  # answered before the connection closes, instead of waiting for a head
JSON_ROUTES = {"chat": "/v1/chat/completions", "embeddings": "/v1/embeddings"}
FORM_ROUTE = "/v1/audio/transcriptions"
# A field each JSON service reads as an integer, for the 10^30 entry.
INTEGER_FIELDS = {"chat": b'"top_k"', "embeddings": b'"dimensions"'}
VALID = {
    "chat": b'{"messages": [{"role": "user", "content": "hi"}]',
    "embeddings": b'{"input": "hi"',
}


def http(path: str, body: bytes, *headers: str, content_type: str = "application/json") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"Content-Type: {content_type}"] if content_type else []
    lines += [f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def json_corpus(service: str) -> list[Hostile]:
    """Entries for a JSON route: `open` is a valid body without its closing brace."""
    path, open_, field = JSON_ROUTES[service], VALID[service], INTEGER_FIELDS[service]
    return [
        Hostile("lone surrogate", http(path, open_ + b', "x": "\\ud800"}'), 400, "invalid_json"),
        Hostile("deep nesting", http(path, b"[" * 100_000 + b"]" * 100_000), 400, "invalid_json"),
        Hostile(
            "5,000-digit integer",
            http(path, open_ + b", " + field + b": " + b"9" * 5000 + b"}"),
            400,
            "invalid_json",
        ),
        Hostile(
            "integer 10^30", http(path, open_ + b", " + field + b": 1" + b"0" * 30 + b"}"), 400
        ),
        Hostile("NaN", http(path, open_ + b", " + field + b": NaN}"), 400, "invalid_type"),
        Hostile("invalid UTF-8", http(path, open_ + b', "x": "\xff\xfe"}'), 400, "invalid_json"),
        Hostile("empty body", http(path, b""), 400, "invalid_json"),
        Hostile("a JSON array", http(path, b"[1, 2]"), 400, "invalid_json"),
        Hostile(
            "text/plain body",
            http(path, open_ + b"}", content_type="text/plain"),
            415,
            "unsupported_media_type",
        ),
        Hostile(
            "form-encoded JSON from a foreign Origin",
            http(
                path,
                open_ + b"}",
                "Origin: http://evil.example",
                content_type="application/x-www-form-urlencoded",
            ),
            403,
            "origin_not_allowed",
        ),
    ]


BOUNDARY = "hostile"


def form(*parts: tuple[str, bytes]) -> bytes:
    out = b""
    for name, value in parts:
        filename = '; filename="a.wav"' if name == "file" else ""
        disposition = f'Content-Disposition: form-data; name="{name}"{filename}'
        out += f"--{BOUNDARY}\r\n{disposition}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def form_corpus(wav: bytes) -> list[Hostile]:
    multipart = f"multipart/form-data; boundary={BOUNDARY}"

    def post(body: bytes, *headers: str, content_type: str = multipart) -> bytes:
        return http(FORM_ROUTE, body, *headers, content_type=content_type)

    return [
        Hostile(
            "5,000-digit temperature", post(form(("file", wav), ("temperature", b"9" * 5000))), 400
        ),
        Hostile(
            "invalid UTF-8 field",
            post(form(("file", wav), ("language", b"\xff\xfe"))),
            400,
            "invalid_form",
        ),
        Hostile(
            "a fallback ladder of 10^300 temperatures",
            http(
                "/inference",
                form(("file", wav), ("temperature_inc", b"1e-300")),
                content_type=multipart,
            ),
            400,
        ),
        Hostile("no file", post(form(("language", b"en"))), 400, "missing_field"),
        Hostile("not audio", post(form(("file", b"\x00" * 64))), 400, "invalid_audio"),
        Hostile("truncated multipart", post(form(("file", wav))[:-40]), 400),
        Hostile("JSON body", post(b'{"file": 1}', content_type="application/json"), 415),
        Hostile(
            "form from a foreign Origin",
            post(form(("file", wav)), "Origin: http://evil.example"),
            403,
            "origin_not_allowed",
        ),
    ]


def transport_corpus(path: str) -> list[Hostile]:
    """Entries for any port (`path`: a route that takes a body): not HTTP, or HTTP at its
    limits."""
    get = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    post = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    return [
        Hostile(
            "TLS client hello",
            bytes.fromhex("16030100a5010000a10303") + b"\x00" * 64,
            400,
            NOT_HTTP,
        ),
        Hostile("random bytes", bytes(range(256)) * 4, 400, NOT_HTTP),
        Hostile("SSH banner", b"SSH-2.0-OpenSSH_9.6\r\n", 400, NOT_HTTP),
        Hostile("oversized headers", (get + "X-Big: " + "a" * 20_000 + "\r\n\r\n").encode(), 431),
        Hostile("two Host headers", (get + "Host: evil.example\r\n\r\n").encode(), 400, "bad_host"),
        Hostile("foreign Host", get.replace("127.0.0.1", "evil.example").encode() + b"\r\n", 403),
        Hostile(
            "body over the limit",
            (post + "Content-Length: 99999999999\r\n\r\n").encode(),
            413,
        ),
        Hostile(
            "bad chunked encoding",
            (post + "Transfer-Encoding: chunked\r\n\r\nzz\r\n").encode(),
            400,
        ),
    ]
