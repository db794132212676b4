"""The intake benchmark's ceiling: a FastAPI no-op ``POST /hooks/{source}``.

It reads the body and answers 202 with a small JSON object, nothing else. It is
served exactly as ``syncd run`` serves its app: ``uvicorn.Server`` inside
``asyncio.run`` with the same ``uvicorn.Config`` settings (no access log, no
lifespan, default loop and HTTP implementation), in its own process.

Run: ``python bench/noop_app.py --port 8781``
"""

from __future__ import annotations

import argparse
import asyncio

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def create_app() -> FastAPI:
    app = FastAPI(title="no-op intake", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/hooks/{source_name}", status_code=202)
    async def receive(source_name: str, request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse(
            {"event_ids": [0], "event_id": 0, "duplicates": 0, "deliveries": 1},
            status_code=202,
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the no-op intake endpoint.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8781)
    args = parser.parse_args()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(),
            host=args.host,
            port=args.port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
    )
    asyncio.run(server.serve())


if __name__ == "__main__":
    main()
