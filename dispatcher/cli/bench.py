"""``dispatcher bench``: put a load on one method through the dispatcher and say how it held.

What a plugin author or an operator asks before a release: how many calls a second this
method takes through the manifest's policies, with what latency, what fails under load
and how, what a call costs the host's CPU, and how long the plugin takes to start. The
load itself is ``dispatcher.cli._load``; this module parses, runs and prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import orjson

from dispatcher._dispatcher import Dispatcher
from dispatcher.audit import AuditLogError
from dispatcher.cli._app import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Seconds,
    credential_options,
    credentials_from,
    load,
    main,
    manifest_option,
    only_plugin,
    output_option,
)
from dispatcher.cli._gateway_client import GatewayCaller, check_gateway_url
from dispatcher.cli._load import CallOnce, Load, LoadReport, run_load
from dispatcher.config import Manifest
from dispatcher.config.files import read_capped
from dispatcher.identity import Credentials
from linchkit_plugin.errors import DispatchError
from providers._log_lines import printable

#: Most callers one run may have: each is a task with its call in flight.
MOST_CONCURRENCY = 10_000

#: The measured run when neither --calls nor --duration is given.
DEFAULT_DURATION = 10.0

PERCENTILES = (50, 90, 99, 99.9)


@dataclass(frozen=True, slots=True)
class _Run:
    """One bench run's settings, as parsed."""

    plugin: str
    method: str
    params: list[Any]
    load: Load
    warmup: int
    timeout: float | None
    version: str | None


@dataclass(frozen=True, slots=True)
class _Target:
    """What the run calls: ``call(params)``, the method's cache counters when this process
    holds them, and how long what serves the calls took to start when it started here."""

    call: CallOnce
    cache_counts: Callable[[], dict[str, int] | None] | None
    start_ms: float | None


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What the run measured, the start and first call included."""

    start_ms: float | None
    first_call_ms: float
    report: LoadReport
    cache: dict[str, int] | None


@main.command()
@click.argument("target", metavar="PLUGIN.METHOD")
@click.option("-p", "--params", default=None, help="Params as JSON (default: {}).")
@click.option(
    "--params-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON Lines: one params value per line, sent in turn (to miss a pure method's cache).",
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(1, MOST_CONCURRENCY),
    default=16,
    show_default=True,
    help="Calls in flight at once.",
)
@click.option("-n", "--calls", type=click.IntRange(min=1), default=None, help="Calls to make.")
@click.option(
    "-d",
    "--duration",
    type=Seconds(0.001, 7 * 86400),
    default=None,
    help=f"Seconds to start calls for (default {DEFAULT_DURATION:g} without --calls).",
)
@click.option(
    "--rate",
    type=click.FloatRange(0.0, min_open=True),
    default=None,
    help="Open loop: start this many calls a second, each timed from when it was due.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=None,
    help="Calls made before measuring (default: --concurrency), so pools are open.",
)
@click.option("--timeout", type=Seconds(0.001, 3600), default=None, help="Seconds per call.")
@click.option("--caller", default=None, help="Caller identity sent with each call.")
@credential_options
@click.option("--version", "plugin_version", default=None, help="Plugin version (default: latest).")
@click.option(
    "--gateway",
    metavar="URL",
    default=None,
    help="Call through the gateway at URL (dispatcher serve) instead of in this process.",
)
@manifest_option
@output_option
@click.pass_context
def bench(
    context: click.Context,
    target: str,
    params: str | None,
    params_file: Path | None,
    concurrency: int,
    calls: int | None,
    duration: float | None,
    rate: float | None,
    warmup: int | None,
    timeout: float | None,
    caller: str | None,
    api_key: str | None,
    token: str | None,
    plugin_version: str | None,
    gateway: str | None,
    output: str,
) -> None:
    """Call PLUGIN.METHOD under load and print throughput, latency, errors and CPU.

    Every call goes through the manifest's policies (cache, rate limits, breaker, retries,
    deadlines), as a host's calls do; only PLUGIN (and the plugins it falls back to) is
    started. Closed loop by default: --concurrency callers, each calling again as soon as
    its call ends. With --rate, calls start on schedule and each is timed from when it was
    due, so the wait of a method that cannot keep up is counted.

    With --gateway URL the calls go through a running `dispatcher serve` instead, as a
    caller in another language makes them (POST /v1/plugins/P/methods/M, with --api-key
    or --token as its credentials): the manifest is not read, and CPU per call is this
    client's.

    The first call is timed on its own (a cold start shows there; unanswered after 5 s,
    bench says it waits), then --warmup calls, then the measured run. A failed call is counted by its error type and the load goes
    on. Ctrl-C stops starting calls and prints what was measured once the calls in flight
    end; Ctrl-C again abandons them. Exit 0 when every call succeeded, 1 when any failed
    (or the first call did: nothing is measured then), 130 when interrupted.
    """
    plugin, method = _plugin_and_method(target)
    if params is not None and params_file is not None:
        raise click.UsageError("give --params or --params-file, not both")
    values = _params_from_file(params_file) if params_file is not None else [_json(params)]
    if rate is not None and not math.isfinite(rate):
        raise click.UsageError(f"--rate must be a number of calls a second, got {rate}")
    if calls is None and duration is None:
        duration = DEFAULT_DURATION
    run = _Run(
        plugin,
        method,
        values,
        Load(concurrency, calls, duration, rate),
        concurrency if warmup is None else warmup,
        timeout,
        plugin_version,
    )
    if gateway is None:
        manifest = only_plugin(load(context), plugin)
        credentials = credentials_from(manifest, api_key, token)
        target_of = _in_process(manifest, run, caller, credentials)
    else:
        if caller is not None:
            raise click.UsageError(
                "--caller names the caller in this process; the gateway takes it from "
                "--api-key or --token"
            )
        target_of = _through_gateway(_gateway_url(gateway), run, api_key, token)
    try:
        outcome = asyncio.run(_measure(target_of, run))
    except DispatchError as error:
        click.echo(orjson.dumps({"error": error.to_wire()}).decode(), err=True)
        context.exit(EXIT_FAILED)
    except AuditLogError as error:  # its calls are audited: a log it cannot append to
        click.echo(f"error: {error}", err=True)
        context.exit(EXIT_USAGE)
    except (KeyboardInterrupt, asyncio.CancelledError):
        click.echo("interrupted: calls in flight abandoned, nothing to report", err=True)
        context.exit(EXIT_INTERRUPTED)
    if output == "json":
        click.echo(orjson.dumps(_as_json(run, outcome), option=orjson.OPT_INDENT_2).decode())
    else:
        _print_table(run, outcome)
    report = outcome.report
    if report.interrupted:
        context.exit(EXIT_INTERRUPTED)
    if report.failed:
        context.exit(EXIT_FAILED)


# -- parsing ---------------------------------------------------------------------------------


def _plugin_and_method(target: str) -> tuple[str, str]:
    plugin, dot, method = target.rpartition(".")
    if not dot or not plugin or not method:
        raise click.UsageError(f"expected PLUGIN.METHOD, got {target!r}")
    return plugin, method


#: The largest --params-file read: its params are all held while the load runs.
MOST_PARAMS_FILE_BYTES = 256 << 20


def _json(text: str | None) -> Any:
    if text is None:
        return {}
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise click.UsageError(f"--params is not valid JSON: {error}") from None


def _params_from_file(path: Path) -> list[Any]:
    """Every line of a JSON Lines file, decoded; blank lines skipped. A pipe is read for
    10 s at most, and a file past ``MOST_PARAMS_FILE_BYTES`` refused (``/dev/zero`` was
    read for ever, and a FIFO nobody wrote to waited for ever)."""
    try:
        data = read_capped(path, MOST_PARAMS_FILE_BYTES, pipe_wait=10.0)
    except OSError as error:
        raise click.UsageError(f"--params-file {path}: cannot read: {error.strerror}") from None
    if len(data) > MOST_PARAMS_FILE_BYTES:
        most = MOST_PARAMS_FILE_BYTES >> 20
        raise click.UsageError(f"--params-file {path}: larger than {most} MiB")
    values = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            values.append(orjson.loads(line))
        except orjson.JSONDecodeError as error:
            raise click.UsageError(
                f"--params-file {path}, line {number}: not valid JSON ({error})"
            ) from None
    if not values:
        raise click.UsageError(f"--params-file {path} has no params (one JSON value per line)")
    return values


# -- running ---------------------------------------------------------------------------------


def _gateway_url(url: str) -> str:
    try:
        return check_gateway_url(url)
    except ValueError as error:
        raise click.UsageError(f"--gateway: {error}") from None


@contextlib.asynccontextmanager
async def _in_process(
    manifest: Manifest[Any], run: _Run, caller: str | None, credentials: Credentials | None
) -> AsyncIterator[_Target]:
    """A dispatcher of ``manifest`` in this process, its start timed."""
    begun = time.perf_counter()
    async with Dispatcher(manifest) as dispatcher:
        start_ms = (time.perf_counter() - begun) * 1000

        def call(params: Any) -> Awaitable[Any]:
            return dispatcher.call(
                run.plugin,
                run.method,
                params,
                version=run.version,
                caller=caller,
                credentials=credentials,
                timeout=run.timeout,
            )

        yield _Target(call, functools.partial(_cache_counts, dispatcher, run), start_ms)


@contextlib.asynccontextmanager
async def _through_gateway(
    url: str, run: _Run, api_key: str | None, token: str | None
) -> AsyncIterator[_Target]:
    """Calls through a running gateway: one connection per caller."""
    async with GatewayCaller(
        url,
        run.plugin,
        run.method,
        concurrency=run.load.concurrency,
        version=run.version,
        timeout=run.timeout,
        api_key=api_key,
        token=token,
    ) as gateway:
        yield _Target(gateway.call, None, None)


async def _measure(target_of: AbstractAsyncContextManager[_Target], run: _Run) -> _Outcome:
    """Time the first call, warm up, then measure ``run.load``."""
    async with target_of as target:
        call = target.call
        # A method that fails at once fails here, measured or not.
        first_call_ms = await _first_call(call(run.params[0]), f"{run.plugin}.{run.method}")
        stop = asyncio.Event()
        with _StopOnInterrupt(stop):
            if run.warmup:
                warmup = Load(run.load.concurrency, run.warmup, None)
                await run_load(call, run.params, warmup, stop)
            counts = target.cache_counts
            before = counts() if counts is not None else None
            click.echo(f"{run.plugin}.{run.method}: measuring {_extent(run.load)}", err=True)
            report = await run_load(call, run.params, run.load, stop)
        cache = _cache_delta(before, counts() if counts is not None else None)
    return _Outcome(target.start_ms, first_call_ms, report, cache)


#: How long the first call may go unanswered before ``bench`` says it waits.
FIRST_CALL_NOTICE_SECONDS = 5.0


async def _first_call(calling: Awaitable[Any], name: str) -> float:
    """The first call's milliseconds. Unanswered after ``FIRST_CALL_NOTICE_SECONDS``, it
    says so once and waits on: a slow cold start, or a gateway that takes connections and
    never answers, was silence for as long as the call's bound (a day without
    ``--timeout``)."""
    began = time.perf_counter()
    answer = asyncio.ensure_future(calling)
    try:
        await asyncio.wait_for(asyncio.shield(answer), FIRST_CALL_NOTICE_SECONDS)
    except TimeoutError:
        waited = f"{FIRST_CALL_NOTICE_SECONDS:g} s"
        click.echo(f"{name}: the first call has not answered in {waited}; waiting", err=True)
        await answer
    finally:
        answer.cancel()  # Ctrl-C: the call goes with the run (a no-op once it answered)
    return (time.perf_counter() - began) * 1000


def _extent(load: Load) -> str:
    """How long the measured run goes on, for the line that says it has begun."""
    bounds = []
    if load.calls is not None:
        bounds.append(f"{load.calls:,} calls")
    if load.duration is not None:
        bounds.append(f"{load.duration:g} s")
    extent = " or ".join(bounds)
    if len(bounds) > 1:
        extent += ", whichever comes first"
    return f"{extent} (Ctrl-C stops it early)"


class _StopOnInterrupt:
    """While inside: the first Ctrl-C sets ``stop`` (no new calls; those in flight end),
    the second cancels the run. Where the loop cannot take signal handlers, Ctrl-C
    interrupts as Python's default does."""

    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._installed = False

    def __enter__(self) -> None:
        try:
            self._loop.add_signal_handler(signal.SIGINT, self._interrupted)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no Unix
            return
        self._installed = True

    def __exit__(self, *_: object) -> None:
        if self._installed:
            self._loop.remove_signal_handler(signal.SIGINT)

    def _interrupted(self) -> None:
        if self._stop.is_set():
            if self._task is not None:
                self._task.cancel()
            return
        self._stop.set()
        click.echo(
            "stopping: waiting for the calls in flight (Ctrl-C again to abandon them)", err=True
        )


def _cache_counts(dispatcher: Dispatcher, run: _Run) -> dict[str, int] | None:
    """The method's cache counters (every version of the plugin), or None without a cache."""
    prefix, suffix = f"{run.plugin}@", f".{run.method}"
    caches = [
        counters
        for name, counters in dispatcher.stats().get("caches", {}).items()
        if name.startswith(prefix) and name.endswith(suffix)
    ]
    if not caches:
        return None
    return {key: sum(each[key] for each in caches) for key in ("hits", "misses", "coalesced")}


def _cache_delta(
    before: dict[str, int] | None, after: dict[str, int] | None
) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {key: after[key] - before[key] for key in after}


# -- printing --------------------------------------------------------------------------------


def _as_json(run: _Run, outcome: _Outcome) -> dict[str, Any]:
    report = outcome.report
    return {
        "plugin": run.plugin,
        "method": run.method,
        "concurrency": run.load.concurrency,
        "rate": run.load.rate,
        "start_ms": outcome.start_ms,
        "first_call_ms": outcome.first_call_ms,
        "warmup_calls": run.warmup,
        "calls": report.calls,
        "succeeded": report.succeeded,
        "failed": report.failed,
        "errors": {
            kind: {"count": tally.count, "retryable": tally.retryable, "message": tally.message}
            for kind, tally in report.errors.items()
        },
        "seconds": report.elapsed,
        "calls_per_s": report.calls_per_second,
        "latency_ms": {
            **{f"p{percent:g}": report.percentile_ms(percent) for percent in PERCENTILES},
            "max": report.percentile_ms(100),
        },
        "cpu_us_per_call": report.cpu_us_per_call,
        "cache": outcome.cache,
        "not_started": report.not_started,
        "interrupted": report.interrupted,
    }


def _print_table(run: _Run, outcome: _Outcome) -> None:
    report = outcome.report
    pace = f"open loop, {run.load.rate:g} calls/s" if run.load.rate else "closed loop"
    rows = [
        (f"{run.plugin}.{run.method}", f"{pace}, concurrency {run.load.concurrency}"),
        *(
            [("start", f"{outcome.start_ms:,.0f} ms (the dispatcher and the plugin)")]
            if outcome.start_ms is not None
            else []
        ),
        ("first call", f"{outcome.first_call_ms:,.1f} ms"),
        (
            "calls",
            f"{report.calls:,} in {report.elapsed:,.2f} s: {report.calls_per_second:,.0f}/s"
            + (" (interrupted)" if report.interrupted else ""),
        ),
        ("succeeded", f"{report.succeeded:,}" + _share(report.succeeded, report.calls)),
    ]
    if report.not_started:
        rows.append(
            (
                "not started",
                f"{report.not_started:,} calls due by the end were never started: the method "
                f"took fewer than {run.load.rate:g} calls/s at concurrency {run.load.concurrency}",
            )
        )
    for kind, tally in sorted(report.errors.items(), key=lambda item: -item[1].count):
        again = "retryable" if tally.retryable else "not retryable"
        rows.append(
            (
                f"failed {kind}",
                f"{tally.count:,}{_share(tally.count, report.calls)}, {again}: {tally.message}",
            )
        )
    if report.calls:
        latencies = "  ".join(
            f"p{percent:g} {report.percentile_ms(percent):,.2f}" for percent in PERCENTILES
        )
        rows.append(("latency (ms)", f"{latencies}  max {report.percentile_ms(100):,.2f}"))
        whose = "this process" if outcome.start_ms is not None else "this client, not the gateway"
        rows.append(("CPU per call", f"{report.cpu_us_per_call:,.0f} µs ({whose}, every thread)"))
    if outcome.cache is not None:
        cache = outcome.cache
        rows.append(
            (
                "cache",
                f"{cache['hits']:,} hits, {cache['misses']:,} misses, "
                f"{cache['coalesced']:,} joined a call in flight",
            )
        )
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        click.echo(f"{label.ljust(width)}  {printable(value)}")


def _share(part: int, whole: int) -> str:
    return f" ({part / whole:.2%})" if whole else ""
