"""The HTTP face of a :class:`~lmpatch.serve.service.Service` (a FastAPI app).

Routes: OpenAI-compatible generation (``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``), the edit ledger (``/v1/edits``: make, list, inspect, revert, download
a patch), patch uploads (``/v1/patches``), snapshots (``/v1/snapshots``) and the web
page (``/``). Every answer carries ``X-Lmpatch-Generation``: the ledger generation the
model was at when the answer was produced.

Every mistake a client can make gets a JSON error ``{"error": {"message", "type",
"code"}}`` with a 4xx status (OpenAI's shape), and the server stays up.
"""
from __future__ import annotations

import json
import secrets
import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lmpatch.errors import LmpatchError
from lmpatch.serve.generation import Completion, Sampling
from lmpatch.serve.ledger import STATUSES, IdempotencyConflictError
from lmpatch.serve.schemas import ChatBody, CompletionBody, EditBody, SnapshotBody
from lmpatch.serve.service import Service
from lmpatch.serve.worker import Job

__all__ = ["create_app"]

GENERATION_HEADER = "X-Lmpatch-Generation"
STATIC = Path(__file__).resolve().parent / "static"


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(status, message)
        self.code = code


def _error(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status, headers=headers)


class _BodyLimit:
    """ASGI middleware: refuse bodies over the limit (413) whether or not they declare a length."""

    def __init__(self, app, json_limit: int, upload_limit: int) -> None:
        self.app, self.json_limit, self.upload_limit = app, json_limit, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["path"] == "/v1/patches"
        limit = self.upload_limit if upload else self.json_limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        message = (f"Request body over {limit} bytes (the server's {'--max-upload-mb' if upload else '--max-body-mb'} "
                   "limit).")
        too_big = _error(413, message, "body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ApiError(413, message, "body_too_large")
            return message

        return await self.app(scope, counted, send)


class _GenerationHeader:
    """ASGI middleware: every response says the ledger generation (a generation route sets
    the one its answer was produced under; any other gets the current one)."""

    def __init__(self, app, current: Callable[[], int]) -> None:
        self.app, self.current = app, current

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        name = GENERATION_HEADER.lower().encode()

        async def stamped(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                if not any(k.lower() == name for k, _ in headers):
                    headers.append((name, str(self.current()).encode()))
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, stamped)


def _reused(exc: IdempotencyConflictError) -> ApiError:
    """The answer to an Idempotency-Key used before for another request."""
    return ApiError(422, str(exc), "idempotency_key_reused")


def _union_tag(part: Any) -> bool:
    """pydantic's name for the branch of a union it tried ("str", "dict[str,any]"): noise to a client."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part
                                      or part.startswith("function-"))


def create_app(service: Service) -> FastAPI:
    """The app for ``service`` (``uvicorn.run(create_app(service))``)."""
    app = FastAPI(title="lmpatch", version=_version(),
                  description="Serve a language model and edit what it knows while it runs.")
    app.state.service = service
    cfg = service.config

    # ----------------------------------------------------------------- errors

    @app.exception_handler(RequestValidationError)
    async def _invalid(req: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        kind = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            return _error(422, f"The body is not valid JSON ({detail or 'it does not parse'}, at character "
                               f"{first.get('loc', ('', '?'))[-1]}).", "invalid_json")
        if first.get("loc", ())[:1] == ("body",) and kind not in ("application/json", ""):
            # curl -d sends application/x-www-form-urlencoded: the JSON inside is then never read.
            return _error(415, f"Send the body as JSON with 'Content-Type: application/json' (got {kind!r}).",
                          "unsupported_media_type")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body" and not _union_tag(x))
        code = {"query": "invalid_query", "header": "invalid_header", "path": "invalid_path"}.get(
            str(first.get("loc", ("body",))[0]), "invalid_body")
        return _error(422, f"{where or 'body'}: {first.get('msg', 'invalid request')}", code)

    @app.exception_handler(HTTPException)
    async def _http(_req: Request, exc: HTTPException):
        code = getattr(exc, "code", None) or {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return _error(exc.status_code, str(exc.detail), code, headers)

    @app.exception_handler(LmpatchError)
    async def _user(_req: Request, exc: LmpatchError):
        return _error(400, str(exc), "invalid_request")

    app.add_middleware(_BodyLimit, json_limit=cfg.max_body_bytes, upload_limit=cfg.max_upload_bytes)
    app.add_middleware(_GenerationHeader, current=lambda: service.state.generation)

    # ----------------------------------------------------------------- auth

    def _check(authorization: str | None) -> str:
        if not authorization or not authorization.startswith("Bearer "):
            raise ApiError(401, "Missing bearer token: send 'Authorization: Bearer <token>'.", "unauthorized")
        if not secrets.compare_digest(authorization[7:].strip().encode(), service.token.encode()):
            raise ApiError(401, "Wrong bearer token.", "unauthorized")
        return "token"

    def writer(authorization: str | None = Header(None)) -> str:
        return _check(authorization)

    def reader(authorization: str | None = Header(None)) -> None:
        if cfg.protect_reads:
            _check(authorization)

    # ----------------------------------------------------------------- generation

    @app.get("/v1/models", dependencies=[Depends(reader)])
    def models():
        m = service.model
        card = {"id": m.name, "object": "model", "created": 0, "owned_by": "lmpatch",
                "generation": service.state.generation, "base_fingerprint": m.fingerprint,
                "state_fingerprint": service.ledger.state_fingerprint, "edits": len(service.ledger.live())}
        return JSONResponse({"object": "list", "data": [card]})

    def _run(build: Callable, sampling: Sampling, stream: bool, shape: Callable[[Completion, str, str | None], dict],
             kind: str) -> Response:
        try:
            job = service.batcher.submit(build, sampling)
        except TimeoutError as exc:
            raise ApiError(503, f"The model is busy: {exc}; try again.", "busy") from exc
        except LmpatchError as exc:
            raise ApiError(400, str(exc), "invalid_request") from exc
        headers = {GENERATION_HEADER: str(job.generation)}
        rid = f"{kind}-{uuid.uuid4().hex[:24]}"
        if not stream:
            try:
                text = job.text()
            except LmpatchError as exc:
                raise ApiError(400, str(exc), "invalid_request") from exc
            body = shape(job, text, job.finish_reason) | {"id": rid, "created": int(time.time()),
                                                          "model": service.model.name}
            body["usage"] = _usage(job)
            body["lmpatch_generation"] = job.generation
            return JSONResponse(body, headers=headers)

        def events():
            try:
                for piece in job.pieces():
                    chunk = shape(job, piece, None) | {"id": rid, "created": int(time.time()),
                                                       "model": service.model.name}
                    yield f"data: {json.dumps(chunk)}\n\n"
                last = shape(job, "", job.finish_reason) | {"id": rid, "created": int(time.time()),
                                                            "model": service.model.name,
                                                            "usage": _usage(job),
                                                            "lmpatch_generation": job.generation}
                yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
            except LmpatchError as exc:  # the headers are gone: the error is the stream's last event
                yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'invalid_request_error', 'code': 'invalid_request'}})}\n\n"
            finally:
                job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/completions", dependencies=[Depends(reader)])
    def completions(body: CompletionBody):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, f"Send one prompt per request (got {len(prompts)}).", "one_prompt")
        prompt = prompts[0]
        sampling = Sampling(body.max_tokens, body.temperature, body.top_p, body.stops(), body.seed)

        def shape(_job, text, finish):
            return {"object": "text_completion",
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

        return _run(lambda m: m.format_prompts([prompt])[0], sampling, body.stream, shape, "cmpl")

    @app.post("/v1/chat/completions", dependencies=[Depends(reader)])
    def chat_completions(body: ChatBody):
        messages = [m.model_dump() for m in body.messages]
        sampling = Sampling(body.max_completion_tokens or body.max_tokens, body.temperature, body.top_p,
                            body.stops(), body.seed)
        stream = body.stream

        def shape(_job, text, finish):
            if stream:
                return {"object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}
            return {"object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish}]}

        return _run(lambda m: m.format_messages(messages), sampling, stream, shape, "chatcmpl")

    # ----------------------------------------------------------------- the ledger

    def _record(edit_id: str):
        rec = service.ledger.get(edit_id)
        if rec is None:
            raise ApiError(404, f"No edit {edit_id!r} in the ledger.", "edit_not_found")
        return rec

    def _replayed(key: str | None, **request):
        try:
            return service.ledger.replay(key, **request)
        except IdempotencyConflictError as exc:
            raise _reused(exc) from exc

    def _edit_answer(rec, status: int) -> JSONResponse:
        body = rec.public() | {"status_url": f"/v1/edits/{rec.id}"}
        if rec.status in ("committed", "reverted", "reverting") and rec.patch_file:
            body["patch_url"] = f"/v1/edits/{rec.id}/patch"
        return JSONResponse(body, status)

    @app.post("/v1/edits", status_code=202)
    def make_edit(body: EditBody, actor: str = Depends(writer),
                  idempotency_key: str | None = Header(None, max_length=200)):
        from lmpatch.methods.hparams import check_layers, with_overrides
        from lmpatch.methods.registry import get_method
        from lmpatch.model.fits import check_requests_fit
        from lmpatch.request import EditRequest

        info = get_method(body.method)
        info.check_model(service.model)
        check_layers(with_overrides(info.hparams, body.hparams), service.model)  # refused now, not in the background
        items = body.requests if isinstance(body.requests, list) else [body.requests]
        if not items:
            raise ApiError(422, "requests: give at least one edit request.", "invalid_body")
        parsed = [EditRequest.from_dict(r) for r in items]
        check_requests_fit(service.model, parsed)  # refused now: a runaway edit cannot be cancelled once running
        requests = [r.to_dict() for r in parsed]
        prior = _replayed(idempotency_key, kind="edit", method=info.name, hparams=body.hparams, requests=requests)
        if prior is not None:  # a retry: its edit back, even if the ledger has moved on since
            return _edit_answer(prior, 200)
        if body.expected_generation is not None and body.expected_generation != service.ledger.generation:
            raise ApiError(409, f"The ledger is at generation {service.ledger.generation}, not "
                                f"{body.expected_generation}; read the state again.", "stale_generation")
        try:
            rec, created = service.ledger.add(actor=body.actor or actor, kind="edit", method=info.name,
                                              hparams=body.hparams, requests=requests, idempotency_key=idempotency_key)
        except IdempotencyConflictError as exc:
            raise _reused(exc) from exc
        if created:
            service.worker.submit(Job(kind="edit", edit_id=rec.id))
        return _edit_answer(rec, 202 if created else 200)

    @app.get("/v1/edits", dependencies=[Depends(reader)])
    def list_edits(limit: int = Query(50, ge=1, le=500), before: float | None = Query(None),
                   status: str | None = Query(None, max_length=20)):
        if status is not None and status not in STATUSES:
            raise ApiError(400, f"Unknown status {status!r}; choose one of {', '.join(STATUSES)}.", "invalid_query")
        page = service.ledger.page(limit, before, status)
        nxt = f"/v1/edits?limit={limit}&before={page[-1].created!r}" if len(page) == limit else None
        return JSONResponse({"object": "list", "data": [r.public() for r in page], "next": nxt,
                             "generation": service.state.generation})

    @app.get("/v1/edits/{edit_id}", dependencies=[Depends(reader)])
    def get_edit(edit_id: str):
        return _edit_answer(_record(edit_id), 200)

    @app.delete("/v1/edits/{edit_id}")
    def revert_edit(edit_id: str, _actor: str = Depends(writer), wait: float = Query(60.0, ge=0, le=600)):
        rec = _record(edit_id)
        if rec.status == "queued" and service.ledger.cancel(edit_id):
            return _edit_answer(_record(edit_id), 200)
        if rec.status != "reverting" and not service.ledger.mark_reverting(edit_id):
            rec = _record(edit_id)
            raise ApiError(409, f"Edit {edit_id} is {rec.status}; only a committed edit can be reverted.",
                           "not_revertible")
        done = service.worker.submit(Job(kind="revert", edit_id=edit_id))
        try:
            done.result(timeout=wait)
        except FutureTimeout:
            return _edit_answer(_record(edit_id), 202)
        return _edit_answer(_record(edit_id), 200)

    @app.get("/v1/edits/{edit_id}/patch", dependencies=[Depends(reader)])
    def download_patch(edit_id: str):
        rec = _record(edit_id)
        if not rec.patch_file or not Path(rec.patch_file).is_file() or rec.status not in (
                "committed", "reverting", "reverted"):
            raise ApiError(404, f"Edit {edit_id} has no patch ({rec.status}).", "no_patch")
        return FileResponse(rec.patch_file, media_type="application/octet-stream",
                            filename=f"{edit_id}.lmpatch")

    @app.post("/v1/patches", status_code=202, openapi_extra={"requestBody": {
        "required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload_patch(request: Request, actor: str = Depends(writer),
                           idempotency_key: str | None = Header(None, max_length=200)):
        from lmpatch.fileio import atomic_path
        from lmpatch.patch import Patch
        from lmpatch.serve.worker import file_sha256

        if request.headers.get("content-type", "").lower().startswith("multipart/"):
            raise ApiError(415, "Send the .lmpatch file itself as the body (curl --data-binary @FILE), not as a "
                                "multipart form.", "unsupported_media_type")
        data = await request.body()
        if not data:
            raise ApiError(422, "Send the .lmpatch file as the request body.", "invalid_body")
        folder = service.ledger.folder / "patches"
        path = folder / f"upload-{uuid.uuid4().hex[:16]}.lmpatch"
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        try:
            patch = Patch.load(path)
            if patch.model_fingerprint != service.model.fingerprint:
                raise ApiError(422, f"The patch was made for model '{patch.model_name}' (fingerprint "
                                    f"{patch.model_fingerprint}), not the served '{service.model.name}' "
                                    f"({service.model.fingerprint}).", "wrong_model")
            asked = dict(kind="upload", method=patch.method, hparams=patch.hparams,
                         requests=[r.to_dict() for r in patch.requests], patch_id=patch.patch_id)
            prior = _replayed(idempotency_key, **asked)
            if prior is not None:  # a retry: its edit back, though the patch is applied by now
                path.unlink(missing_ok=True)
                return _edit_answer(prior, 200)
            if patch.patch_id in service.state.twin.stack:  # the worker checks again; this answers at once
                raise ApiError(409, f"Patch {patch.patch_id} is already applied; revert its edit first.",
                               "already_applied")
        except (LmpatchError, ApiError) as exc:
            path.unlink(missing_ok=True)
            if isinstance(exc, ApiError):
                raise
            told = str(exc).replace(f"'{path}'", "the uploaded file").replace(str(path), "the uploaded file")
            raise ApiError(422, f"Not a readable patch: {told}", "invalid_patch") from exc
        try:
            rec, created = service.ledger.add(
                actor=actor, kind="upload", method=patch.method, hparams=patch.hparams,
                requests=[r.to_dict() for r in patch.requests], idempotency_key=idempotency_key,
                patch=(patch.patch_id, str(path), file_sha256(path)))
        except IdempotencyConflictError as exc:
            path.unlink(missing_ok=True)
            raise _reused(exc) from exc
        if created:
            service.worker.submit(Job(kind="edit", edit_id=rec.id))
        else:
            path.unlink(missing_ok=True)
        return _edit_answer(rec, 202 if created else 200)

    @app.post("/v1/snapshots", status_code=201)
    def snapshot(body: SnapshotBody | None = None, _actor: str = Depends(writer)):
        from lmpatch.patch.patch import write_merged

        name = (body.name if body and body.name else None) or f"gen-{service.ledger.generation}"
        out = service.ledger.folder / "snapshots" / name
        if out.exists():
            raise ApiError(409, f"Snapshot {name!r} already exists.", "snapshot_exists")

        def write(twin):
            # Name the edits a plain checkpoint cannot hold by what a client can act on: their ids.
            stuck = [r for r in service.ledger.live() if r.patch_id in {
                e.patch.patch_id for e in twin.stack.entries if not e.patch.mergeable}]
            if stuck:
                ids = ", ".join(f"{r.id} ({r.method})" for r in stuck)
                raise ApiError(409, f"Edit(s) {ids} add modules or memories a plain checkpoint cannot hold; revert "
                                    "them (DELETE /v1/edits/ID) to snapshot the rest, or keep serving them as "
                                    "patches.", "not_mergeable")
            write_merged(twin, out, {"generation": service.ledger.generation,
                                     "state_fingerprint": service.ledger.state_fingerprint})
            return {"object": "snapshot", "name": name, "path": str(out), "generation": service.ledger.generation,
                    "state_fingerprint": service.ledger.state_fingerprint}

        result = service.worker.submit(Job(kind="call", fn=write)).result()
        return JSONResponse(result, 201)

    # ----------------------------------------------------------------- the page

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    def health():
        return {"status": "ok", "generation": service.state.generation, "model": service.model.name}

    return app


def _usage(job: Completion) -> dict[str, Any]:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


def _version() -> str:
    from lmpatch import __version__

    return __version__
