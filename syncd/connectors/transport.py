"""Sending HTTP requests with aiohttp: an httpx transport, and a direct path.

Connectors speak httpx (its API, its exceptions, respx in unit tests); the
transport underneath is swapped, which is the seam httpx offers for it.
Why: httpx's own async pool (httpcore on anyio) spends most of its time on
connection bookkeeping under concurrency. Measured on our 2-core machines
against a local receiver, 16 requests in flight: httpx's default async
transport about 340 requests/s, aiohttp about 3,400. The daemon sends
through this transport; tests that build a connector by hand keep httpx's.

:meth:`AiohttpTransport.send` is the same request without httpx's request
and response objects around it (about half the CPU of a small request): the
REST connector uses it when it is given this transport. Failures raise the
same httpx exceptions in both cases, so classification does not depend on
the path taken.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import aiohttp
import httpx
from multidict import CIMultiDictProxy

#: Headers aiohttp computes itself from the URL and body.
_SKIP = {"host", "content-length", "transfer-encoding"}


class Answer:
    """A response read whole: what :meth:`AiohttpTransport.send` returns.

    Reads like the parts of ``httpx.Response`` the connectors use (``status_code``,
    ``headers``, ``content``, ``text``, ``json()``); ``text`` and a compressed
    body go through a real ``httpx.Response``, built only when asked for.
    """

    __slots__ = ("_content", "_httpx", "_raw_headers", "headers", "status_code")

    def __init__(
        self,
        status: int,
        headers: CIMultiDictProxy[str],
        raw_headers: Sequence[tuple[bytes, bytes]],
        content: bytes,
    ) -> None:
        self.status_code = status
        self.headers = headers
        self._raw_headers = raw_headers
        self._content = content
        self._httpx: httpx.Response | None = None

    def as_httpx(self, request: httpx.Request | None = None) -> httpx.Response:
        if self._httpx is None or request is not None:
            self._httpx = httpx.Response(
                self.status_code,
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in self._raw_headers],
                content=self._content,
                request=request,
            )
        return self._httpx

    @property
    def content(self) -> bytes:
        """The body, decoded from its Content-Encoding as httpx would."""
        if "content-encoding" in self.headers:
            return self.as_httpx().content
        return self._content

    @property
    def text(self) -> str:
        return self.as_httpx().text

    def json(self) -> Any:
        return json.loads(self.content)


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, limit: int = 100, limit_per_host: int = 0) -> None:
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily: a session belongs to the event loop it was made in.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._limit, limit_per_host=self._limit_per_host
                ),
                auto_decompress=False,  # httpx decodes Content-Encoding itself
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            )
        return self._session

    async def send(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | None,
        client_timeout: aiohttp.ClientTimeout,
        request: httpx.Request | None = None,
    ) -> Answer:
        """One request, its answer read whole. Failures raise httpx's exceptions.

        ``headers`` are sent as given (aiohttp adds Host and Content-Length); the
        body is not decompressed, whatever its Content-Encoding.
        """
        try:
            async with self._get_session().request(
                method,
                url,
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=client_timeout,
            ) as response:
                content = await response.read()
                return Answer(response.status, response.headers, response.raw_headers, content)
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
        except (TimeoutError, aiohttp.SocketTimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except (
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientPayloadError,
            aiohttp.ClientOSError,
        ) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.TransportError(str(exc) or type(exc).__name__, request=request) from exc

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
        )
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() not in _SKIP]
        body = await request.aread()
        answer = await self.send(request.method, str(request.url), headers, body, timeout, request)
        return answer.as_httpx(request)

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
