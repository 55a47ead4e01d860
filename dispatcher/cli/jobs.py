"""``dispatcher submit``, ``jobs``, ``job`` and ``dlq list|redrive|purge``: async jobs.

They talk to the job store the manifest's ``state:`` names (Redis), not to a gateway:
``submit`` runs a dispatcher with only the job's plugin and no workers, so the method,
the caller's access and the params are checked as ``Dispatcher.submit`` checks them; the
others open the store alone and start no plugin. Every command closes what it opened
within a bound (``CLOSE_SECONDS``), so a Redis that stops answering cannot hang it.

Exit codes: 0 success; 1 the job failed or was dead-lettered, ``--wait`` ran out, a job is
unknown, or the store did not answer; 2 bad usage, or a manifest whose ``state:`` keeps
no jobs (the memory backend).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import click
import orjson

from dispatcher._dispatcher import Dispatcher
from dispatcher._jobs import JobNotFinished, JobNotFound, ended_error, job_status
from dispatcher.cli._app import (
    EXIT_FAILED,
    EXIT_USAGE,
    Seconds,
    credential_options,
    credentials_from,
    load,
    main,
    manifest_option,
    only_plugin,
    output_option,
    run_or_report,
    table,
)
from dispatcher.config import Manifest
from dispatcher.state import JobStore, new_backend
from dispatcher.state.callback_outbox import CALLBACK_STATES
from dispatcher.state.job_store import JOB_STATES, TERMINAL_STATES
from linchkit_plugin.errors import DispatchError
from providers._log_lines import printable

T = TypeVar("T")

#: The longest a command waits for the store to close once its work is done.
CLOSE_SECONDS = 5.0
#: Each Redis operation of a command may take this long (or the manifest's own, if longer).
OP_TIMEOUT_MS = 5_000

NO_JOBS = (
    "the manifest keeps no jobs: async jobs need 'state: {backend: redis, url: …}' or"
    " 'jobs: {backend: sqs, sqs: {…}}'"
)
#: Dead-lettered jobs ``dlq redrive --all`` reads at a time.
REDRIVE_PAGE = 500
#: The longest ``dispatcher job --wait`` waits.
MAX_WAIT_SECONDS = 3600.0
#: How many recent jobs ``dispatcher jobs --state`` reads to find ``--limit`` of that state.
SCAN_FOR_STATE = 10_000

_json_flag = click.option("--json", "as_json", is_flag=True, help="Same as -o json.")


class _Refused(Exception):
    """What a command reports instead of its answer, and the exit code it ends with."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


@contextlib.asynccontextmanager
async def _job_store(manifest: Manifest[Any]) -> AsyncIterator[JobStore]:
    """The manifest's job store, closed within ``CLOSE_SECONDS`` whatever happens.

    Not started: a command needs no pushed notifications (``--wait`` polls), so no
    listener connection is opened for it.
    """
    # A longer bound than a call's: a listing reads thousands of records in one operation,
    # and no caller's deadline waits on an operator's command.
    bound = max(manifest.state.op_timeout_ms, OP_TIMEOUT_MS)
    config = manifest.state.model_copy(update={"op_timeout_ms": bound})
    backend = new_backend(config, asyncio.get_running_loop().time, manifest.jobs)
    try:
        store = backend.jobs
        if store is None:
            raise _Refused(NO_JOBS, EXIT_USAGE)
        await store.open()
        yield store
    finally:
        closing = asyncio.get_running_loop().create_task(backend.aclose())
        await asyncio.wait((closing,), timeout=CLOSE_SECONDS)
        if not closing.done():
            closing.cancel()


def _with_store(context: click.Context, work: Callable[[JobStore], Awaitable[T]]) -> T:
    """Run ``work`` on the manifest's store; a refusal or a store error ends the command."""
    manifest = load(context)

    async def session() -> T:
        async with _job_store(manifest) as store:
            return await work(store)

    try:
        return asyncio.run(session())
    except _Refused as refused:
        click.echo(f"error: {refused}", err=True)
        context.exit(refused.code)
    except DispatchError as error:
        click.echo(f"error: {error.message}", err=True)
        context.exit(EXIT_FAILED)
    raise AssertionError("unreachable: exit raises")


def _print_json(value: Any) -> None:
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _time(milliseconds: object) -> str:
    """A record's time (ms since the epoch, as ``job_status`` reads it) in UTC."""
    if type(milliseconds) is not int:
        return "-"
    try:
        moment = datetime.datetime.fromtimestamp(milliseconds / 1000, datetime.UTC)
    except (OverflowError, OSError, ValueError):  # a record written by hand: no such time
        return "?"
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _error_type(status: dict[str, Any]) -> str:
    """A listing row's error type: read by the store (the error itself may be too large
    to list), none once the job succeeded (what failed before is not its error)."""
    if status.get("state") == "succeeded":
        return "-"
    kind = status.get("error_type")
    if isinstance(kind, str):
        return kind
    return "?" if "error" in status or "error_bytes" in status else "-"


def _rows(statuses: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    header = (
        "ID",
        "METHOD",
        "STATE",
        "ATTEMPTS",
        "SUBMITTED (UTC)",
        "FINISHED (UTC)",
        "ERROR",
        "CALLBACK",
    )
    return [
        header,
        *(
            (
                str(status.get("id", "?")),
                f"{status.get('plugin', '?')}.{status.get('method', '?')}",
                str(status.get("state", "?")),
                str(status.get("attempts", 0)),
                _time(status.get("submitted_at")),
                _time(status.get("finished_at")),
                _error_type(status),
                str(status.get("callback", "-")),
            )
            for status in statuses
        ),
    ]


def _show(statuses: list[dict[str, Any]], output: str, as_json: bool, empty: str) -> None:
    if output == "json" or as_json:
        _print_json(statuses)
    elif statuses:
        table(_rows(statuses))
    else:
        click.echo(empty)


# -- submit ------------------------------------------------------------------------------


@main.command()
@click.argument("plugin")
@click.argument("method")
@click.argument("params", default="{}", required=False)
@click.option("--caller", default=None, help="Caller identity the job carries.")
@credential_options
@click.option("--version", "plugin_version", default=None, help="Plugin version (default: latest).")
@click.option("--idempotency-key", default=None, help="The job runs at most once per key.")
@click.option(
    "--callback-url",
    default=None,
    help="POST the job's record here when it ends (checked against the manifest's egress).",
)
@_json_flag
@manifest_option
@click.pass_context
def submit(
    context: click.Context,
    plugin: str,
    method: str,
    params: str,
    caller: str | None,
    api_key: str | None,
    token: str | None,
    plugin_version: str | None,
    idempotency_key: str | None,
    callback_url: str | None,
    as_json: bool,
) -> None:
    """Queue a call of PLUGIN METHOD with PARAMS (JSON) as an async job; print its id.

    A worker of any dispatcher sharing the manifest's Redis (jobs: {workers: N}) runs it;
    read it with `dispatcher job ID`. Only PLUGIN is started here, to check the method,
    the caller's access and the params now; no worker runs in this command.
    """
    try:
        decoded = orjson.loads(params)
    except orjson.JSONDecodeError as error:
        raise click.UsageError(f"PARAMS is not valid JSON: {error}") from None
    manifest = load(context)
    if manifest.state.backend != "redis" and manifest.jobs.backend != "sqs":
        click.echo(f"error: {NO_JOBS}", err=True)
        context.exit(EXIT_USAGE)
    # No workers in a command that only submits: the job is for the serving replicas.
    manifest = only_plugin(manifest, plugin).model_copy(
        update={"jobs": manifest.jobs.model_copy(update={"workers": 0})}
    )
    credentials = credentials_from(manifest, api_key, token)

    async def queue(dispatcher: Dispatcher) -> str:
        return await dispatcher.submit(
            plugin,
            method,
            decoded,
            version=plugin_version,
            caller=caller,
            credentials=credentials,
            idempotency_key=idempotency_key,
            callback_url=callback_url,
        )

    job_id = run_or_report(context, manifest, queue)
    click.echo(orjson.dumps({"id": job_id}).decode() if as_json else job_id)


# -- jobs, job -----------------------------------------------------------------------------


@main.command()
@click.option(
    "--state", type=click.Choice(JOB_STATES), default=None, help="Only jobs in this state."
)
@click.option(
    "--callback",
    type=click.Choice(CALLBACK_STATES),
    default=None,
    help="Only jobs whose callback is in this state (failed: given up, dead-lettered).",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=20,
    show_default=True,
    help="At most this many, newest first.",
)
@output_option
@_json_flag
@manifest_option
@click.pass_context
def jobs(
    context: click.Context,
    state: str | None,
    callback: str | None,
    limit: int,
    output: str,
    as_json: bool,
) -> None:
    """List recent jobs: state, attempts, times, the type of their error (none once
    succeeded), where their callback stands.

    Jobs are listed while their records are kept (jobs.result_ttl_ms; dead-lettered ones
    until purged). --state and --callback look among the latest 10,000 (every
    dead-lettered job for --state dead). A row holds what a list needs, each value
    bounded: params and result by their sizes (params_bytes, result_bytes), an error
    whole when small; `dispatcher job ID` shows a job whole.
    """

    def wanted(record: dict[str, str]) -> bool:
        return (state is None or record.get("state") == state) and (
            callback is None or record.get("callback") == callback
        )

    async def read(store: JobStore) -> list[dict[str, Any]]:
        if state == "dead" and callback is None:
            records = await store.dead(limit)
        elif state is not None or callback is not None:
            scanned = await store.recent(max(limit, SCAN_FOR_STATE))
            records = [record for record in scanned if wanted(record)][:limit]
        else:
            records = await store.recent(limit)
        return [job_status(record) for record in records]

    _show(_with_store(context, read), output, as_json, "no jobs")


@main.command()
@click.argument("job_id", metavar="ID")
@click.option(
    "--wait",
    type=Seconds(0, MAX_WAIT_SECONDS),
    default=0.0,
    show_default=True,
    help="Seconds to wait for the job to end.",
)
@click.option("--result", "only_result", is_flag=True, help="Print only the result.")
@manifest_option
@click.pass_context
def job(context: click.Context, job_id: str, wait: float, only_result: bool) -> None:
    """Print job ID's record as JSON (or, with --result, what it returned).

    Exit 1 when the job failed or was dead-lettered (its error on stderr with --result),
    or when --wait ran out before it ended.
    """
    if not (0 < len(job_id) <= 64 and job_id.isprintable()):
        raise click.BadParameter("a job id is 1 to 64 printable characters", param_hint="ID")

    async def read(store: JobStore) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            record = await store.record(job_id)
            if record is None:
                raise JobNotFound(f"no job {job_id!r}: never submitted, or its record expired")
            left = deadline - loop.time()
            if record.get("state") in TERMINAL_STATES or left <= 0:
                return job_status(record)
            await store.changed(job_id, min(left, 0.5))

    status = _with_store(context, read)
    state = status.get("state")
    if only_result and state == "succeeded":
        _print_json(status.get("result"))
    elif only_result and state in TERMINAL_STATES:  # final, as Dispatcher.result raises it
        final = ended_error(str(state), status.get("error"))
        click.echo(orjson.dumps({"error": final.to_wire()}).decode(), err=True)
    elif only_result:
        unfinished = JobNotFinished(f"job {job_id} is {state} after {status['attempts']} attempts")
        click.echo(orjson.dumps({"error": unfinished.to_wire()}).decode(), err=True)
    else:
        _print_json(status)
    if state != "succeeded" and (state in TERMINAL_STATES or wait > 0 or only_result):
        context.exit(EXIT_FAILED)


# -- dead letters ------------------------------------------------------------------------------


@main.group()
def dlq() -> None:
    """Dead-lettered jobs: list them, put them back on the stream, or drop them."""


@dlq.command(name="list")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@output_option
@_json_flag
@manifest_option
@click.pass_context
def list_dead(context: click.Context, limit: int, output: str, as_json: bool) -> None:
    """Dead-lettered jobs, newest first, with the type of the error that ended them."""

    async def read(store: JobStore) -> list[dict[str, Any]]:
        return [job_status(record) for record in await store.dead(limit)]

    _show(_with_store(context, read), output, as_json, "no dead-lettered jobs")


def _chosen(job_ids: tuple[str, ...], every: bool) -> None:
    if bool(job_ids) == every:
        raise click.UsageError("name the jobs (ID …) or pass --all, not both")
    for job_id in job_ids:
        if not (0 < len(job_id) <= 64 and job_id.isprintable()):
            raise click.BadParameter(f"{job_id[:64]!r} is not a job id", param_hint="ID")


@dlq.command()
@click.argument("job_ids", metavar="[ID]...", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every dead-lettered job.")
@manifest_option
@click.pass_context
def redrive(context: click.Context, job_ids: tuple[str, ...], every: bool) -> None:
    """Put dead-lettered jobs back on the stream with their attempts reset.

    Exit 1 if a named job was not dead-lettered (or, a malformed entry, cannot run).
    """
    _chosen(job_ids, every)

    async def send_back(store: JobStore) -> tuple[list[str], list[str]]:
        redriven: list[str] = []
        refused: list[str] = []
        if job_ids:
            for job_id in job_ids:
                (redriven if await store.redrive(job_id) else refused).append(job_id)
            return redriven, refused
        # --all, a page at a time: a redriven job leaves the dead letters, one that cannot
        # run again (a malformed entry) stays, and is not asked about twice.
        seen: set[str] = set()
        while True:
            page = [str(r.get("id")) for r in await store.dead(REDRIVE_PAGE + len(refused))]
            fresh = [job_id for job_id in page if job_id not in seen]
            if not fresh:
                return redriven, refused
            for job_id in fresh:
                seen.add(job_id)
                (redriven if await store.redrive(job_id) else refused).append(job_id)

    redriven, refused = _with_store(context, send_back)
    click.echo(f"redriven: {len(redriven)}")
    for job_id in refused:
        shown = printable(job_id)  # read from the store: whoever wrote it chose it
        click.echo(f"not redriven: {shown} (not dead-lettered, or nothing it could run)", err=True)
    if refused and job_ids:
        context.exit(EXIT_FAILED)


@dlq.command()
@click.argument("job_ids", metavar="[ID]...", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every dead-lettered job.")
@click.option("--yes", is_flag=True, help="Drop them: without it, nothing is dropped.")
@manifest_option
@click.pass_context
def purge(context: click.Context, job_ids: tuple[str, ...], every: bool, yes: bool) -> None:
    """Drop dead-lettered jobs and their records for good (needs --yes)."""
    _chosen(job_ids, every)
    if not yes:
        click.echo("error: purge drops jobs for good: pass --yes to confirm", err=True)
        context.exit(EXIT_USAGE)

    async def drop(store: JobStore) -> int:
        return await store.purge(list(job_ids) if job_ids else None)

    dropped = _with_store(context, drop)
    click.echo(f"purged: {dropped}")
    if job_ids and dropped < len(set(job_ids)):
        click.echo("some named jobs were not dead-lettered: left alone", err=True)
        context.exit(EXIT_FAILED)


__all__ = ["dlq", "job", "jobs", "submit"]
