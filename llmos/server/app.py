"""The FastAPI app: OpenAI's routes over one `AsyncEngine`, plus `/health` and `/metrics`.

The app's lifespan starts the engine thread and stops it; everything a route needs lives in one
`ServerState`, so several apps (as in tests) never share globals.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from llmos import __version__
from llmos.engine.async_engine import AsyncEngine
from llmos.server import console, errors, openapi, processes, tracing
from llmos.server.chat import create_chat_completion
from llmos.server.completions import create_completion
from llmos.server.limits import Guard
from llmos.server.messages import count_tokens, create_message
from llmos.server.processes_host import ProcessHost
from llmos.server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from llmos.server.response_store import ResponseStore
from llmos.server.responses import (
    create_response,
    delete_response,
    list_input_items,
    retrieve_response,
)
from llmos.server.responses_protocol import ResponseObject, ResponsesRequest
from llmos.server.state import ServerConfig, ServerState
from llmos.server.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    detokenize,
    tokenize,
    tokenizer_info,
)
from llmos.server.users import Authenticate, User

_HEALTH_TIMEOUT = 10.0  # seconds for the engine thread to answer between two steps


def create_app(
    engine: AsyncEngine, config: ServerConfig | None = None, kernel: ProcessHost | None = None
) -> FastAPI:
    """With `kernel`, the app also serves /v1/processes and /v1/usage, and maps API keys to
    users (see users.py)."""
    state = ServerState(engine, config or ServerConfig())
    store = ResponseStore(state.config.responses_db)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            if kernel is not None:  # its processes stop (resumable) before the engine does
                await asyncio.to_thread(kernel.close)
            await asyncio.to_thread(engine.shutdown)
            store.close()

    app = FastAPI(title="llmos", version=__version__, lifespan=lifespan)
    app.state.llmos = state

    def count(request: Request, status: int) -> None:
        if request.url.path.startswith("/v1"):
            state.metrics.count(status)

    errors.install(app, count)
    openapi.install(
        app,
        [
            ChatCompletionRequest,
            CompletionRequest,
            ResponsesRequest,
            TokenizeRequest,
            DetokenizeRequest,
            *(processes.MODELS if kernel is not None else []),
        ],
    )
    if kernel is not None:  # its keys (with --api-key's, an admin's) replace the Guard's one
        if state.config.api_key:
            kernel.users.keys.setdefault(state.config.api_key, User("admin", admin=True))
        app.add_middleware(
            Authenticate, users=kernel.users, on_refused=lambda _p, s: state.metrics.count(s)
        )
    app.add_middleware(
        Guard,
        api_key=state.config.api_key if kernel is None else None,
        max_body_bytes=state.config.max_body_bytes,
        is_draining=lambda: state.draining,
        on_refused=lambda _path, status: state.metrics.count(status),
    )
    # request spans and trace id headers (when tracing is on); the kernel's metrics from its DB
    tracing.install(app, state, kernel.kernel.store.path if kernel is not None else None)

    @app.post(
        "/v1/chat/completions",
        openapi_extra=openapi.body(ChatCompletionRequest),
        responses=openapi.responses(ChatCompletion, stream=True),
    )
    async def chat_completions(request: Request) -> Response:
        with errors.internal_errors(request.url.path):
            return await create_chat_completion(state, request)

    @app.post(
        "/v1/completions",
        openapi_extra=openapi.body(CompletionRequest),
        responses=openapi.responses(Completion, stream=True),
    )
    async def completions(request: Request) -> Response:
        with errors.internal_errors(request.url.path):
            return await create_completion(state, request)

    @app.post(
        "/v1/responses",
        openapi_extra=openapi.body(ResponsesRequest),
        responses=openapi.responses(ResponseObject, stream=True),
    )
    async def responses(request: Request) -> Response:
        with errors.internal_errors(request.url.path):
            return await create_response(state, store, request)

    @app.get(
        "/v1/responses/{response_id}", responses=openapi.responses(ResponseObject, stream=False)
    )
    async def get_response(response_id: str) -> Response:
        return retrieve_response(state, store, response_id)

    @app.get("/v1/responses/{response_id}/input_items")
    async def get_input_items(
        response_id: str, limit: int = 20, order: str = "desc", after: str | None = None
    ) -> Response:
        return list_input_items(state, store, response_id, limit=limit, order=order, after=after)

    @app.delete("/v1/responses/{response_id}")
    async def remove_response(response_id: str) -> Response:
        return delete_response(state, store, response_id)

    # Anthropic's Messages API; out of the OpenAPI document, whose errors are OpenAI's shape
    @app.post("/v1/messages", include_in_schema=False)
    async def messages(request: Request) -> Response:
        return await create_message(state, request)

    @app.post("/v1/messages/count_tokens", include_in_schema=False)
    async def messages_count_tokens(request: Request) -> Response:
        return await count_tokens(state, request)

    @app.post(
        "/tokenize",
        openapi_extra=openapi.body(TokenizeRequest),
        responses=openapi.responses(TokenizeResponse, stream=False),
    )
    async def tokenize_route(request: Request) -> Response:
        with errors.internal_errors(request.url.path):
            return await tokenize(state, request)

    @app.post(
        "/detokenize",
        openapi_extra=openapi.body(DetokenizeRequest),
        responses=openapi.responses(DetokenizeResponse, stream=False),
    )
    async def detokenize_route(request: Request) -> Response:
        with errors.internal_errors(request.url.path):
            return await detokenize(state, request)

    @app.get("/tokenizer_info")
    async def tokenizer_info_route() -> JSONResponse:
        return JSONResponse(tokenizer_info(state))

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        state.metrics.count(200)
        return ModelList(data=[_card(state)])

    @app.get("/v1/models/{model:path}", responses=openapi.responses(ModelCard, stream=False))
    async def get_model(model: str) -> ModelCard:
        state.check_model(model)
        state.metrics.count(200)
        return _card(state)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        try:
            alive = engine.call(lambda _: True)
            await asyncio.wait_for(asyncio.wrap_future(alive), _HEALTH_TIMEOUT)
        except (TimeoutError, RuntimeError):
            return JSONResponse({"status": "engine not answering"}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await state.metrics.render_async(engine), media_type=CONTENT_TYPE_LATEST)

    if kernel is not None:
        processes.install(app, state, kernel)
    console.install(app, state, kernel)

    return app


def _card(state: ServerState) -> ModelCard:
    return ModelCard(id=state.model_name, created=state.created, max_model_len=state.max_model_len)


def server_state(app: FastAPI) -> ServerState:
    """The state of an app made by `create_app` (the launcher marks it draining)."""
    return app.state.llmos
