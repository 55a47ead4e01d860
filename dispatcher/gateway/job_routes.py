"""The gateway's async-job routes (``docs/gateway.md``), registered by
``dispatcher.gateway.app``:

    POST /v1/plugins/{plugin}/methods/{method}:submit   a call's body and checks, as a job → 202
    GET  /v1/jobs/{id}                           the job's record (?wait=S: until it ends)
    GET  /v1/jobs/{id}/result                    its result as a call's envelope (202: not yet)

A submission takes a call's path to ``Dispatcher.submit`` (authenticated, checked against
``access``, audited as kind ``submit``); its job carries the caller's principal. A job is
read only by the principal that submitted it (anonymous callers share the jobs submitted
anonymously): another caller's job answers 404, exactly as a job that does not exist, so
ids cannot be probed. Its errors are told as a call's are (``Disclosure.job``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from dispatcher._dispatcher import Dispatcher
from dispatcher._jobs import JobNotFinished, ended_error
from dispatcher.gateway.body import Refused, read_params
from dispatcher.gateway.call_headers import idempotency_key_of, version_of
from dispatcher.gateway.credentials import credentials_of
from dispatcher.gateway.disclosure import Disclosure
from dispatcher.gateway.errors import error_answer
from dispatcher.gateway.settings import GatewaySettings
from dispatcher.identity import Credentials, Principal
from dispatcher.state.job_store import TERMINAL_STATES
from linchkit_plugin.errors import (
    DispatchError,
    InvalidParams,
    Overloaded,
    ProviderError,
    ShuttingDown,
)
from providers.invocation import new_request_id

__all__ = ["Authenticate", "CallerOf", "JobRoutes"]

_JOB_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}\Z")
_JSON = "application/json"

#: Who calls, as a call's route learns it: the credentials the request presented (read
#: when asked) → the principal the host's authenticator found, or the credentials for the
#: dispatcher to authenticate (``Gateway._caller``).
CallerOf = Callable[
    [Callable[[], Credentials]], Awaitable[tuple[Principal | None, Credentials | None]]
]
#: A request's principal, or the refusal raised (``Gateway._authenticate``).
Authenticate = Callable[[web.Request], Awaitable[Principal | None]]


class JobRoutes:
    """The job routes of one gateway over one started ``Dispatcher``; who calls is
    learnt as the gateway's other routes learn it (``caller_of``, ``authenticate``)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        settings: GatewaySettings,
        disclosure: Disclosure,
        *,
        caller_of: CallerOf,
        authenticate: Authenticate,
    ) -> None:
        self.dispatcher = dispatcher
        self.settings = settings
        self.disclosure = disclosure
        self._caller_of = caller_of
        self._authenticate = authenticate
        #: ``GET /v1/jobs/{id}?wait=`` requests parked now (bounded: ``max_job_waits``).
        self._job_waits = 0

    async def submit(self, request: web.Request) -> web.Response:
        """``POST …/methods/{method}:submit``: the body, headers and checks of a call;
        ``Idempotency-Key`` and ``X-Callback-Url`` go with the job. 202 and its Location."""
        headers = request.headers
        body_read = False
        try:
            caller, credentials = await self._caller_of(partial(credentials_of, request))
            idempotency_key = idempotency_key_of(headers)
            params = await read_params(request, self.settings)
            body_read = True
            match = request.match_info
            job_id = await self.dispatcher.submit(
                match["plugin"],
                match["method"],
                params,
                version=version_of(headers),
                caller=caller,
                credentials=credentials,
                idempotency_key=idempotency_key,
                callback_url=headers.get("X-Callback-Url"),
                error_detail=self.disclosure.detail,
            )
        except Refused as refused:
            answer = error_answer(refused.error, status=refused.status, close=refused.close)
            answer.headers.update(refused.headers)
            return answer
        except DispatchError as error:
            # Told as a call's failure is: the state store down, a drain, a full audit log
            # name the infrastructure (the store's address) in their messages. The id ties
            # the caller's answer to the line the gateway logs.
            match = request.match_info
            about = f"{match['plugin']}.{match['method']}:submit"
            unread = not body_read and request.body_exists
            closing = unread or isinstance(error, ShuttingDown)
            return self._failed(error, "submit", about, close=closing)
        location = f"/v1/jobs/{job_id}"
        body = orjson.dumps({"ok": True, "job_id": job_id, "location": location})
        return web.Response(
            status=202, body=body, headers={"Content-Type": _JSON, "Location": location}
        )

    async def job(self, request: web.Request) -> web.Response:
        """``GET /v1/jobs/{id}[?wait=S]``: the caller's own job, waiting up to S seconds
        (at most ``max_job_wait``) for it to end; its errors told as a call's are."""
        try:
            status = await self._waited_job(request)
        except DispatchError as error:
            return self._failed(error, "read", _job_named(request))
        return _json_answer({"ok": True, "job": self.disclosure.job(status)})

    async def job_result(self, request: web.Request) -> web.Response:
        """``GET /v1/jobs/{id}/result[?wait=S]``: a finished job's result as a call's
        envelope, its error as a call's error (told as one is) but final (``ended_error``:
        not retryable, no ``Retry-After``); 202 with ``Retry-After`` until it ends."""
        try:
            status = await self._waited_job(request)
        except DispatchError as error:
            return self._failed(error, "read", _job_named(request))
        state = status.get("state")
        if state == "succeeded":
            return _json_answer({"ok": True, "result": status.get("result")})
        if state in TERMINAL_STATES:  # final: no Retry-After, whatever its type's status
            wire = self.disclosure.job(status).get("error")
            return error_answer(ended_error(state, wire if isinstance(wire, dict) else None))
        waiting = JobNotFinished(
            f"job {status.get('id')} is {state} after {status.get('attempts')} attempts",
            details={"state": state},
        )
        body = orjson.dumps({"ok": False, "error": waiting.to_wire()})
        headers = {"Content-Type": _JSON, "Retry-After": "1"}
        return web.Response(status=202, body=body, headers=headers)

    def _failed(
        self, error: DispatchError, route: str, about: str, *, close: bool = False
    ) -> web.Response:
        """A job route's failure, as its caller is told it (the job store's address and
        its errors' words stay in the log); ``X-Request-Id`` names the logged line."""
        request_id = new_request_id()
        told = self.disclosure.public_job_error(error, route, about, request_id)
        answer = error_answer(told, close=close)
        answer.headers["X-Request-Id"] = request_id
        return answer

    async def _waited_job(self, request: web.Request) -> dict[str, Any]:
        principal = await self._authenticate(request)
        job_id = request.match_info["id"]
        if not _JOB_ID.match(job_id):
            raise InvalidParams("a job id is 1-64 characters of A-Z a-z 0-9 . _ : -")
        wait = _wait_of(request.query, self.settings.max_job_wait)
        owner = principal.id if principal is not None else None
        status = await self._own_job(job_id, owner)
        if wait > 0 and status.get("state") not in TERMINAL_STATES:
            if self._job_waits >= self.settings.max_job_waits:
                raise Overloaded(
                    f"this gateway already holds {self.settings.max_job_waits} job waits"
                    " (max_job_waits): ask again, or without ?wait=",
                    retry_after=1.0,
                )
            self._job_waits += 1
            try:
                with contextlib.suppress(DispatchError):  # its end, or not yet: read below
                    await self.dispatcher.result(job_id, wait=wait)
            finally:
                self._job_waits -= 1
            status = await self._own_job(job_id, owner)
        return status

    async def _own_job(self, job_id: str, owner: str | None) -> dict[str, Any]:
        # The owner is compared before the record is decoded, or fetched whole: a caller
        # probing ids made the gateway decode other callers' params and results.
        return await self.dispatcher.job_for(job_id, owner)

    def __repr__(self) -> str:
        return f"<JobRoutes waits={self._job_waits}/{self.settings.max_job_waits}>"


def _job_named(request: web.Request) -> str:
    """``job ID`` when the path's id is one (it is echoed to its caller), else ``job``."""
    job_id = request.match_info["id"]
    return f"job {job_id}" if _JOB_ID.match(job_id) else "job"


def _wait_of(query: Any, most: float) -> float:
    """``?wait=`` in seconds: a number in [0, ``most``]; absent is 0 (answer at once)."""
    text = query.get("wait")
    if text is None:
        return 0.0
    try:
        wait = float(text)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= most:  # NaN fails
        raise InvalidParams(f"wait is a number of seconds in [0, {most:g}]")
    return wait


def _json_answer(document: dict[str, Any]) -> web.Response:
    try:
        body = orjson.dumps(document)
    except TypeError as error:
        return error_answer(ProviderError(f"the job's record is not JSON: {error}"))
    return web.Response(body=body, headers={"Content-Type": _JSON})
