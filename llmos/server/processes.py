"""The kernel over HTTP: `/v1/processes` (spawn, list, read, follow, kill, approve) and
`/v1/usage` (with budgets).

Each route reads the store, not the kernel's live objects: the store is what every step lands
in first (and what a process run by `llmos run` on the same DB writes too). A process that is
not the caller's is a 404, as if it did not exist; an admin key sees everything.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from llmos.kernel import ProgramError, journal
from llmos.kernel.process import Status
from llmos.server import openapi
from llmos.server.errors import APIError
from llmos.server.processes_host import ProcessHost
from llmos.server.processes_protocol import (
    ApproveRequest,
    Budget,
    BudgetRequest,
    ProcessInfo,
    ProcessList,
    SpawnRequest,
    Transcript,
    UsageReport,
    UsageRow,
    pending_approvals,
    step_info,
    summary,
)
from llmos.server.state import ServerState
from llmos.server.streaming import DONE, event
from llmos.server.users import User, user_of

MODELS = [SpawnRequest, ApproveRequest, BudgetRequest]
POLL = 0.1  # seconds between looks at the store for new steps, in an events stream
_INT63 = 2**63 - 1  # SQLite's integers
Pid = Annotated[int, PathParam(ge=1, le=_INT63, description="The process's id.")]
_SSE = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def install(app: FastAPI, state: ServerState, host: ProcessHost) -> None:
    store = host.kernel.store

    def own(pid: int, user: User) -> Any:
        """The process's row, or 404 when it does not exist or is someone else's."""
        row = store.one("SELECT * FROM processes WHERE pid = ?", (pid,))
        if row is None or not user.owns(row["owner"]):
            raise APIError(404, f"no process with pid {pid}", param="pid", code="process_not_found")
        return row

    def info(row: Any, transcript: Transcript | None = None) -> ProcessInfo:
        """One process in full: its steps are read for its usage and pending approvals."""
        proc = journal.load(store, row["pid"])
        u = proc.usage
        usage = {
            "prompt_tokens": u.prompt_tokens,
            "cached_tokens": u.cached_tokens,
            "completion_tokens": u.completion_tokens,
            "engine_seconds": u.engine_seconds,
            "cost": u.cost,
        }
        return summary(row, usage, len(proc.steps), pending_approvals(proc), transcript)

    def listing(rows: list[Any]) -> list[ProcessInfo]:
        """Many processes in two queries (usage and step counts), not a load each: the
        console polls this. Only those waiting on a person are read in full."""
        pids = [r["pid"] for r in rows]
        marks = ",".join("?" * len(pids))
        usage = {
            r["pid"]: dict(r)
            for r in store.query(
                "SELECT pid, SUM(prompt_tokens) AS prompt_tokens, SUM(cached_tokens) AS"
                " cached_tokens, SUM(completion_tokens) AS completion_tokens, SUM(engine_seconds)"
                f" AS engine_seconds, SUM(cost) AS cost FROM usage WHERE pid IN ({marks})"
                " GROUP BY pid",
                tuple(pids),
            )
        }
        steps = {
            r["pid"]: r["n"]
            for r in store.query(
                f"SELECT pid, COUNT(*) AS n FROM steps WHERE pid IN ({marks}) GROUP BY pid",
                tuple(pids),
            )
        }
        return [
            info(r)
            if r["status"] == Status.WAITING_APPROVAL.value
            else summary(r, usage.get(r["pid"], {}), steps.get(r["pid"], 0), [], None)
            for r in rows
        ]

    def ok(model: type, *, stream: bool = False) -> dict[int | str, dict[str, Any]]:
        answers = openapi.responses(model, stream=False)
        answers[403] = {"model": openapi.ErrorResponse, "description": "Not allowed to this key."}
        answers[404] = {"model": openapi.ErrorResponse, "description": "No such process."}
        answers[409] = {"model": openapi.ErrorResponse, "description": "Not in that state."}
        if stream:
            answers[200] = {"description": "Server-sent events ending in [DONE].", **_SSE[200]}
        return answers

    @app.post(
        "/v1/processes",
        openapi_extra=openapi.body(SpawnRequest),
        responses=ok(ProcessInfo),
        tags=["processes"],
        summary="Spawn a process",
    )
    async def spawn(request: Request) -> ProcessInfo:
        user = user_of(request)
        body = SpawnRequest.model_validate_json(await request.body())
        program = host.program(body.program, user)
        workspace = host.workspace(body.workspace, user)
        host.check_budget(user)
        try:
            pid = await asyncio.to_thread(
                host.kernel.spawn,
                program,
                body.input,
                user.name,
                body.priority,
                workspace=workspace,
            )
        except (ProgramError, ValueError) as exc:
            raise APIError(
                400, f"program: {exc}", param="program", code="invalid_program"
            ) from None
        state.metrics.count(200)
        return info(own(pid, user))

    @app.get("/v1/processes", responses=ok(ProcessList), tags=["processes"])
    async def list_processes(
        request: Request,
        status: Annotated[Status | None, Query(description="Only processes in this state.")] = None,
        user: Annotated[
            str | None, Query(description="Only this user's (an admin's filter).")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> ProcessList:
        caller = user_of(request)
        where, args = [], []
        if not caller.admin:
            where.append("owner = ?")
            args.append(caller.name)
        elif user is not None:
            where.append("owner = ?")
            args.append(user)
        if status is not None:
            where.append("status = ?")
            args.append(status.value)
        sql = "SELECT * FROM processes" + (" WHERE " + " AND ".join(where) if where else "")
        rows = store.query(sql + " ORDER BY pid DESC LIMIT ?", (*args, limit))
        state.metrics.count(200)
        return ProcessList(data=listing(rows) if rows else [])

    @app.get("/v1/processes/{pid}", responses=ok(ProcessInfo), tags=["processes"])
    async def get_process(
        request: Request,
        pid: Pid,
        offset: Annotated[
            int, Query(ge=0, le=_INT63, description="The first transcript step to return.")
        ] = 0,
        limit: Annotated[
            int, Query(ge=0, le=1000, description="Transcript steps to return.")
        ] = 100,
    ) -> ProcessInfo:
        row = own(pid, user_of(request))
        total = store.one("SELECT COUNT(*) FROM steps WHERE pid = ?", (pid,))[0]
        rows = store.query(
            "SELECT seq, kind, data, created_at FROM steps WHERE pid = ? ORDER BY seq"
            " LIMIT ? OFFSET ?",
            (pid, limit, offset),
        )
        steps = [step_info(r["seq"], r["kind"], r["data"], r["created_at"]) for r in rows]
        state.metrics.count(200)
        return info(row, Transcript(offset=offset, limit=limit, total=total, steps=steps))

    @app.get(
        "/v1/processes/{pid}/events", responses=ok(ProcessInfo, stream=True), tags=["processes"]
    )
    async def process_events(
        request: Request,
        pid: Pid,
        after: Annotated[
            int, Query(ge=-1, le=_INT63, description="Send the steps after this seq.")
        ] = -1,
    ) -> StreamingResponse:
        user = user_of(request)
        own(pid, user)
        state.metrics.count(200)
        return StreamingResponse(
            follow(pid, user, after), media_type="text/event-stream", headers=_NO_BUFFERING
        )

    async def follow(pid: int, user: User, after: int) -> AsyncIterator[str]:
        """Each step as it lands, each change of state, then the final process and [DONE]."""
        seen_status = None
        while True:
            row = own(pid, user)  # the state first: steps read after a finish are all of them
            rows = store.query(
                "SELECT seq, kind, data, created_at FROM steps WHERE pid = ? AND seq > ?"
                " ORDER BY seq",
                (pid, after),
            )
            for r in rows:
                step = step_info(r["seq"], r["kind"], r["data"], r["created_at"])
                yield event({"type": "process.step", "pid": pid, "step": step.model_dump()})
                after = r["seq"]
            if row["status"] != seen_status:
                seen_status = row["status"]
                current = info(row)
                yield event(
                    {
                        "type": "process.status",
                        "pid": pid,
                        "status": seen_status,
                        "pending_approvals": [a.model_dump() for a in current.pending_approvals],
                    }
                )
            if Status(row["status"]).finished:
                yield event({"type": "process.done", "process": info(row).model_dump()})
                break
            if state.draining:
                yield APIError(503, "the server is shutting down", code="shutting_down").sse()
                break
            await asyncio.sleep(POLL)
        yield DONE

    @app.post("/v1/processes/{pid}/kill", responses=ok(ProcessInfo), tags=["processes"])
    async def kill(request: Request, pid: Pid) -> ProcessInfo:
        user = user_of(request)
        row = own(pid, user)
        if Status(row["status"]).finished:
            raise _conflict(pid, row["status"], "kill")
        await asyncio.to_thread(host.kernel.kill, pid)
        state.metrics.count(200)
        return info(own(pid, user))

    @app.post(
        "/v1/processes/{pid}/approve",
        openapi_extra=openapi.body(ApproveRequest),
        responses=ok(ProcessInfo),
        tags=["processes"],
    )
    async def approve(request: Request, pid: Pid) -> ProcessInfo:
        user = user_of(request)
        row = own(pid, user)
        body = ApproveRequest.model_validate_json(await request.body())
        pending = {a.call_id for a in info(row).pending_approvals}
        if body.call_id not in pending:
            raise APIError(
                409,
                f"call_id: process {pid} is not waiting for a decision on {body.call_id!r}"
                + (f"; it waits on {sorted(pending)}" if pending else f" (it is {row['status']})"),
                param="call_id",
                code="no_pending_approval",
                type="invalid_request_error",
            )
        await asyncio.to_thread(host.kernel.approve, pid, body.call_id, body.allow)
        state.metrics.count(200)
        return info(own(pid, user))

    @app.get("/v1/usage", responses=ok(UsageReport), tags=["usage"])
    async def usage(
        request: Request,
        user: Annotated[
            str | None, Query(description="Only this user's (an admin's filter).")
        ] = None,
    ) -> UsageReport:
        caller = user_of(request)
        who = user if caller.admin else caller.name
        everyone = caller.admin and user is None
        state.metrics.count(200)
        return usage_report(host, None if everyone else who)

    @app.post(
        "/v1/usage/budgets",
        openapi_extra=openapi.body(BudgetRequest),
        responses=ok(Budget),
        tags=["usage"],
    )
    async def set_budget(request: Request) -> Budget:
        caller = user_of(request)
        body = BudgetRequest.model_validate_json(await request.body())
        if not caller.admin:
            raise APIError(
                403,
                "budgets are set with an admin key",
                code="permission_denied",
                type="invalid_request_error",
            )
        host.kernel.set_budget(body.user, body.max_tokens, body.max_cost)
        state.metrics.count(200)
        return next(b for b in usage_report(host, body.user).budgets if b.user == body.user)


_NO_BUFFERING = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _conflict(pid: int, status: str, what: str) -> APIError:
    return APIError(
        409,
        f"process {pid} is already {status}; there is nothing to {what}",
        param="pid",
        code="process_finished",
        type="invalid_request_error",
    )


def usage_report(host: ProcessHost, user: str | None) -> UsageReport:
    """Tokens and cost by user (and model) and by program; budgets with what they used."""
    store, meter = host.kernel.store, host.kernel.meter
    where, args = ("WHERE u.user = ?", (user,)) if user is not None else ("", ())
    sums = (
        "COUNT(*) AS calls, SUM(u.prompt_tokens) AS prompt_tokens,"
        " SUM(u.cached_tokens) AS cached_tokens, SUM(u.completion_tokens) AS completion_tokens,"
        " SUM(u.engine_seconds) AS engine_seconds, SUM(u.cost) AS cost"
    )
    by_user = store.query(
        f"SELECT u.user AS user, u.model AS model, {sums} FROM usage u {where}"
        " GROUP BY u.user, u.model ORDER BY u.user, u.model",
        args,
    )
    by_program = store.query(
        f"SELECT p.program_name AS program, u.user AS user, {sums} FROM usage u"
        f" JOIN processes p ON p.pid = u.pid {where}"
        " GROUP BY p.program_name, u.user ORDER BY p.program_name, u.user",
        args,
    )
    budget_rows = store.query(
        "SELECT * FROM budgets" + (" WHERE user = ?" if user is not None else " ORDER BY user"),
        args,
    )
    budgets = []
    for b in budget_rows:
        tokens, cost = meter.user_totals(b["user"])
        budgets.append(
            Budget(
                user=b["user"],
                max_tokens=b["max_tokens"],
                max_cost=b["max_cost"],
                used_tokens=tokens,
                used_cost=cost,
            )
        )
    return UsageReport(
        user=user,
        by_user=[UsageRow(**dict(r)) for r in by_user],
        by_program=[UsageRow(**dict(r)) for r in by_program],
        budgets=budgets,
    )
