"""Plugin entries published in etcd (``registry:``), followed and merged into the manifest.

``RegistryEntries`` follows ``<prefix>/`` (``dispatcher.fleet.sources.etcd_client``), keeps
the entries trust allows (``dispatcher.config.registry.entry_item``) and, after each change
and a ``debounce_ms`` quiet, asks the dispatcher to apply them: ``Dispatcher.reload`` of
the file's manifest, which ``merge`` extends with the entries (``merge_entries``: each entry
validated alone and against ``egress``, the whole checked as a whole). So a registry
change obeys every rule of a reload: kept versions untouched, new ones attached before
routes swap, removed ones drained. A merge or reload that fails changes nothing; it is
logged, kept in ``apply_error`` and shown in health until a later change applies.

etcd failing never removes anything: the follower reports only what a successful read or
watch said, so the last entries stay in use until etcd answers again (``error`` says why
meanwhile). An entry left out (trust, validation) is logged once per reason, never with
its value, and listed in ``skipped``, ``stats()`` and ``health``.

Bounded by ``trust.max_entries``: the entries kept are the first keys in key order
(``FirstKeys``: every replica keeps the same ones), the keys past them are counted in
``dropped`` and not even parsed; keys refused by trust are listed up to the same bound,
the others counted in ``unlisted``. Both overflows are logged sparingly. Whoever writes
the prefix, a key at a time while it is watched, would otherwise choose how many plugin
versions the host attaches and how much of its memory and log they fill. No caller waits
on the follower, so an entry past the bound is a logged drop, not a refusal; a kept entry
that leaves while others wait past the bound has the prefix read again (``EtcdPrefix``),
which says which comes next. A read goes in pages (a prefix of any size is read) and
replaces what was kept only once whole, so a reload meanwhile merges the entries of the
read before, never half of this one.

The dispatcher owns the task (``start``; ended in ``aclose``); a failure inside an apply is
caught here, so the task lives as long as the dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dispatcher._health import TargetHealth
from dispatcher._reload import fixed_changes
from dispatcher.config import Manifest, ManifestError, RegistryConfig, merge_entries
from dispatcher.config.registry import entry_item
from dispatcher.fleet.sources.etcd_client import Change, EtcdPrefix, PrefixRead, one_line
from dispatcher.fleet.sources.first_keys import FirstKeys
from dispatcher.fleet.sources.health import ReadHealth
from providers._log_lines import sparingly
from providers.base import Health
from providers.tls import ClientTlsContext

__all__ = ["RegistryEntries"]

log = logging.getLogger("dispatcher.registry")

#: ``apply()``: reload the dispatcher with the file's manifest and these entries.
Apply = Callable[[], Awaitable[object]]
#: ``waiting()``: the task whose reload waits now for the calls in flight at its swap.
Waiting = Callable[[], "asyncio.Task[Any] | None"]
#: How often an apply under way looks whether a newer change may overtake it.
_OVERTAKE_POLL = 0.05


@dataclass(slots=True)
class _Kept:
    """What the follower keeps of the prefix: built afresh by each read, then swapped in."""

    #: Entries trust allows, by key: ``plugins:`` items, not yet validated. The first
    #: ``trust.max_entries`` keys in order; the others counted (``dropped``).
    items: FirstKeys[dict[str, Any]]
    #: Keys trust refused (at most ``max_entries``: the others counted in ``unlisted``).
    refused: dict[str, str] = field(default_factory=dict)
    unlisted: int = 0


class RegistryEntries:
    """The registry's plugin entries, as last read, and the task that follows them."""

    def __init__(
        self, config: RegistryConfig, apply: Apply, *, waiting: Waiting = lambda: None
    ) -> None:
        self.config = config
        self.name = config.describe()
        self._apply = apply
        self._waiting = waiting
        self._etcd = EtcdPrefix(
            str(config.etcd),
            config.prefix,
            timeout=config.timeout_ms / 1000,
            retry=config.retry_ms / 1000,
            tls=None if config.tls is None else ClientTlsContext(config.tls),
            auth=config.auth,
            idle_probe=config.idle_probe_ms / 1000,
        )
        self._kept = _Kept(FirstKeys(config.trust.max_entries))
        #: Overflows so far, what their log lines are spared by (``sparingly``): keys
        #: refused and left unlisted, and changes that began to leave entries out.
        self._unlisted_seen = 0
        self._drops_begun = 0
        self._dropping = False
        #: Keys the merge left out, with the reason.
        self._invalid: dict[str, str] = {}
        self._logged: dict[str, str] = {}
        #: Why the last read failed (None once one succeeds); reads that succeeded, and
        #: failed. An outage is logged when it begins and when it ends, not per retry.
        self.error: str | None = None
        self.reads = 0
        self.failed_reads = 0
        self._health = ReadHealth(self, log, plural=("entry", "entries"))
        #: Why the last apply changed nothing (None once one succeeds); applies that did.
        self.apply_error: str | None = None
        self.applied = 0
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- what the dispatcher asks -----------------------------------------------------------

    async def read_once(self) -> None:
        """One read as the dispatcher starts, so it serves the registry's entries from its
        first calls on; etcd failing here only delays them (``follow`` reads again)."""
        reason = await self._etcd.read_or_reason(self._read())
        if reason is not None:
            self._failed(reason, 0)
            return
        self._changed.clear()

    def merge(self, base: Manifest[Any], running: Manifest[Any], *, source: str) -> Manifest[Any]:
        """``base`` (a file's manifest) with the entries; ``ManifestError`` if the whole is
        invalid. Entries left out are recorded, not raised.

        An entry republished under a running version with other process settings
        (``config``, ``runtime``…) would refuse the whole reload, holding up every other
        change: that entry is left out and the running one kept, until it is published
        under a new version."""
        merged, invalid = merge_entries(
            base, dict(self._kept.items.items()), source=f"{source} + {self.name}"
        )
        on_file = {plugin.key for plugin in base.plugins}
        was = {plugin.key: plugin for plugin in running.plugins}
        plugins = []
        for plugin in merged.plugins:
            previous = was.get(plugin.key)
            if previous is None or plugin.key in on_file:
                plugins.append(plugin)
                continue
            if changed := fixed_changes(previous, plugin):
                invalid[f"{self.config.prefix}/{plugin.key}"] = (
                    f"{plugin.key} runs with another {', '.join(changed)}; the running entry"
                    " is kept: publish the change as a new version"
                )
                plugin = previous
            plugins.append(plugin)
        self._invalid = invalid
        self._log_skipped()
        return merged.model_copy(update={"plugins": plugins})

    async def start(self) -> None:
        """Read once and apply what was read (a dispatcher starts with the registry's
        entries when etcd answers), then follow the prefix in tasks ended by ``aclose``."""
        if self._tasks:
            return
        await self.read_once()
        if self.reads:
            await self._apply_once()
        follow = self._etcd.follow(self._read, self._change, self._failed)
        self._tasks = [
            asyncio.create_task(follow, name=f"registry {self.name}"),
            asyncio.create_task(self._apply_changes(), name=f"registry apply {self.name}"),
        ]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._etcd.aclose()

    @property
    def dropped(self) -> int:
        """Entries past ``trust.max_entries`` left out (exact after each read; between
        reads, ``first_keys`` says how they are counted)."""
        return self._kept.items.beyond

    @property
    def unlisted(self) -> int:
        """Keys trust refused past the bound of those listed, only counted."""
        return self._kept.unlisted

    @property
    def skipped(self) -> dict[str, str]:
        """Every key left out, with the reason (trust first, then validation)."""
        return {**self._invalid, **self._kept.refused}

    def stats(self) -> dict[str, Any]:
        return {
            "registry": self.name,
            "entries": sorted(set(self._kept.items) - set(self._invalid)),
            "skipped": self.skipped,
            "dropped": self.dropped,
            "unlisted": self.unlisted,
            "reads": self.reads,
            "error": self.error,
            "applied": self.applied,
            "apply_error": self.apply_error,
        }

    def health(self, *, draining: bool) -> list[TargetHealth]:
        """One report for the registry, one per key left out (``not_serving``, the reason)."""
        if self.error is not None or self.apply_error is not None:
            detail = "; ".join(filter(None, (self.error, self.apply_error)))
            state = Health("not_serving", detail)
        elif not self.reads:
            state = Health("unknown", "not read yet")
        else:
            entries = f"{len(self._kept.items) - len(self._invalid)} entries"
            if self.dropped:
                entries += (
                    f"; {self.dropped} more left out past trust.max_entries"
                    f" ({self.config.trust.max_entries})"
                )
            state = Health("serving", entries)
        reports = [
            TargetHealth("registry", "-", self.name, state, source="registry", draining=draining)
        ]
        reports += [
            TargetHealth(
                "registry",
                "-",
                key,
                Health("not_serving", f"left out: {reason}"),
                source="registry",
                draining=draining,
            )
            for key, reason in sorted(self.skipped.items())
        ]
        return reports

    # -- following --------------------------------------------------------------------------

    def _read(self) -> PrefixRead:
        """A fresh read: its pages fill a new ``_Kept``, swapped in once the read is whole."""
        kept = _Kept(FirstKeys(self.config.trust.max_entries))

        def page(values: list[tuple[str, bytes]]) -> None:
            for key, value in values:
                self._put(kept, key, value, created=True)

        def done() -> None:
            previous, self._kept = self._kept, kept
            self._health.succeeded(len(kept.items))
            # The same value read again keeps its verdict until the merge.
            self._invalid = {
                key: why
                for key, why in self._invalid.items()
                if key in kept.items and kept.items.get(key) == previous.items.get(key)
            }
            self._log_skipped()
            self._changed.set()

        return PrefixRead(page, done)

    def _change(self, changes: list[Change]) -> bool:
        """Apply a batch of the watch; True asks for the prefix to be read again (a kept
        entry left while others wait past the bound)."""
        read_again = False
        kept = self._kept
        for change in changes:
            if change.value is None:
                read_again |= kept.items.remove(change.key)
                kept.refused.pop(change.key, None)
                self._invalid.pop(change.key, None)
            else:
                before = kept.items.get(change.key)
                read_again |= self._put(kept, change.key, change.value, created=change.created)
                # The same value written again keeps its verdict until the merge.
                if change.key not in kept.items or kept.items.get(change.key) != before:
                    self._invalid.pop(change.key, None)
        self._log_skipped()
        self._changed.set()
        return read_again

    def _put(self, kept: _Kept, key: str, value: bytes, *, created: bool) -> bool:
        """Keep, refuse or count ``key`` in ``kept``; True when a kept entry left (refused
        now) and the prefix must be read again to know which takes its place."""
        kept.refused.pop(key, None)
        if kept.items.past(key, created=created):
            return False  # past the bound: not parsed at all
        try:
            item = entry_item(key, value, self.config)
        except ValueError as wrong:
            self._refuse_entry(kept, key, str(wrong))
            return kept.items.remove(key)
        kept.items.put(key, item, created=created)
        return False

    def _refuse_entry(self, kept: _Kept, key: str, reason: str) -> None:
        if len(kept.refused) < self.config.trust.max_entries:
            kept.refused[key] = reason
            return
        kept.unlisted += 1
        self._unlisted_seen += 1
        if sparingly(self._unlisted_seen):
            log.warning(
                "registry %s: more than %d keys refused by trust; the others are left out"
                " and not listed (%d such keys so far)",
                self.name,
                self.config.trust.max_entries,
                self._unlisted_seen,
            )

    def _failed(self, reason: str, delay: float) -> None:
        retry = f", reading again in {delay:.3g} s" if delay else ""
        self._health.failed(f"{reason}; keeping the last {len(self._kept.items)} entries{retry}")

    def _log_skipped(self) -> None:
        dropped = self.dropped
        if dropped and not self._dropping:  # not at each key more: ``dropped`` counts
            self._drops_begun += 1
            if sparingly(self._drops_begun):
                log.warning(
                    "registry %s: %d entries past trust.max_entries (%d) left out; the"
                    " first keys in order are used",
                    self.name,
                    dropped,
                    self.config.trust.max_entries,
                )
        self._dropping = dropped > 0
        skipped = self.skipped
        for key, reason in skipped.items():
            if self._logged.get(key) != reason:
                log.warning("registry %s: entry %r left out: %s", self.name, key, reason)
        self._logged = dict(skipped)

    async def _apply_changes(self) -> None:
        debounce = self.config.debounce_ms / 1000
        while True:
            await self._changed.wait()
            await asyncio.sleep(debounce)  # changes arriving meanwhile apply together
            self._changed.clear()
            await self._apply_overtaken()

    async def _apply_overtaken(self) -> None:
        """``_apply_once``, given up in its wait if a newer change comes meanwhile.

        A reload waits, after its routes swapped, for every call in flight at the swap
        that may reach a version it retired (up to its grace, 30 s) before it ends that
        version: one slow call or stream there, and the next change waited that long
        behind it (a version deleted and published again went unserved all that time).
        The newer change stops that wait:
        this apply's routes are in, and the next reload ends what it retired once the
        calls in flight then are done (``Dispatcher.reload``: a reload given up in its
        wait). Given up before its swap it is not: a registry changing without pause
        would have none go through."""
        apply = asyncio.create_task(self._apply_once(), name=f"registry apply {self.name}")
        try:
            while not apply.done():
                await asyncio.wait({apply}, timeout=_OVERTAKE_POLL)
                if self._changed.is_set() and not apply.done() and self._waiting() is apply:
                    apply.cancel()
                    await asyncio.wait({apply})
                    self.applied += 1  # its swap is in: what it read is served
                    self.apply_error = None
        finally:
            if not apply.done():  # the dispatcher closing: the reload ends first
                apply.cancel()
                await asyncio.wait({apply})

    async def _apply_once(self) -> None:
        try:
            await self._apply()
        except ManifestError as error:
            self._refuse("; ".join(problem.render(error.source) for problem in error.problems))
        except Exception as error:  # a plugin that fails to attach, a closing dispatcher
            self._refuse(one_line(str(error)) or type(error).__name__)
        else:
            self.applied += 1
            self.apply_error = None

    def _refuse(self, reason: str) -> None:
        self.apply_error = f"registry change not applied, nothing changed: {reason}"
        log.error("%s", self.apply_error)

    def __repr__(self) -> str:
        state = f" error={self.error!r}" if self.error else ""
        return (
            f"<RegistryEntries {self.name} entries={len(self._kept.items)} dropped={self.dropped}"
            f" skipped={len(self.skipped)} reads={self.reads} applied={self.applied}{state}>"
        )
