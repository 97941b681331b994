"""The served-model table and the repository reconciler.

:class:`ModelTable` maps model -> version -> :class:`~nacguard.serving.loaded.LoadedVersion`.
A request picks its version and takes a lease in one synchronous step on the event loop
(:meth:`ModelTable.lease`), so a swap -- add the new version, remove the old one, both
synchronous -- is atomic for requests: each one is served wholly by the old version or wholly
by the new. The old version is retired only after its leases end.

:class:`Reconciler` makes the table follow the repository: scan, choose by the version policy,
load and warm up what is missing (a version that fails is refused with one log line and
``nacguard_model_load_failures_total``, and not tried again until its files change), swap it in,
retire what the policy no longer wants. A model never loses its last working version to a
broken new one. A model's ``shadow`` file names a version loaded as its shadow profile
(:mod:`nacguard.serving.shadow`) instead of served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nacguard.errors import BundleError, ModelNotFound
from nacguard.monitoring.exposition import RepositoryMetrics
from nacguard.serving.loaded import LoadedVersion, WeightsPool
from nacguard.serving.repository import Scan, VersionEntry, VersionPolicy
from nacguard.serving.shadow import Shadow
from nacguard.settings import Settings

__all__ = ["ModelTable", "Reconciler"]

log = logging.getLogger("nacguard.service")


class ModelTable:
    """The loaded versions of every model; the highest loaded version of a model is its served
    one unless another was promoted.

    Args:
        default: the model answering requests that name none (``None``: the first by name).
    """

    def __init__(self, default: str | None = None) -> None:
        self._models: dict[str, dict[int, LoadedVersion]] = {}
        self._promoted: dict[str, int] = {}
        self._shadows: dict[str, Shadow] = {}
        self.requested_default = default

    @property
    def default(self) -> str | None:
        """The model answering requests that name none."""
        if self.requested_default in self._models:
            return self.requested_default
        return min(self._models) if self._models else None

    def __bool__(self) -> bool:
        return bool(self._models)

    def versions(self, model: str) -> dict[int, LoadedVersion]:
        """The loaded versions of ``model`` (empty if none)."""
        return self._models.get(model, {})

    def models(self) -> dict[str, list[int]]:
        """Every model with its loaded versions, ascending."""
        return {m: sorted(v) for m, v in sorted(self._models.items())}

    def all(self) -> list[LoadedVersion]:
        """Every loaded version (the default model's served one first)."""
        out = sorted(
            (lv for versions in self._models.values() for lv in versions.values()),
            key=lambda lv: lv.entry.key,
        )
        first = self.served_or_none(None)
        return sorted(out, key=lambda lv: lv is not first)

    def served_version(self, model: str) -> int | None:
        """The version answering requests for ``model`` that name none."""
        versions = self._models.get(model)
        if not versions:
            return None
        promoted = self._promoted.get(model)
        return promoted if promoted in versions else max(versions)

    def served_or_none(self, model: str | None, version: int | None = None) -> LoadedVersion | None:
        """The version a request for ``model`` (and ``version``) would get, or None."""
        name = model if model is not None else self.default
        if name is None:
            return None
        versions = self._models.get(name, {})
        number = version if version is not None else self.served_version(name)
        return versions.get(number) if number is not None else None

    def get(self, model: str | None, version: int | None = None) -> LoadedVersion:
        """Like :meth:`served_or_none`, raising instead of returning None.

        Raises:
            ModelNotFound: no such model, or no such version loaded.
        """
        found = self.served_or_none(model, version)
        if found is None:
            name = model if model is not None else self.default
            if name not in self._models:
                raise ModelNotFound(f"model {name!r} is not served; models: {sorted(self._models)}")
            raise ModelNotFound(
                f"model {name!r} has no version {version} loaded; versions: "
                f"{sorted(self._models[name])}"
            )
        return found

    def lease(self, model: str | None, version: int | None = None) -> LoadedVersion:
        """:meth:`get` and take a lease in one step; release it with ``release()``."""
        return self.get(model, version).acquire()

    def add(self, loaded: LoadedVersion) -> None:
        """Make ``loaded`` addressable (served at once when it is the highest version)."""
        model, version = loaded.entry.key
        loaded.set_shadow(self._shadows.get(model))
        self._models.setdefault(model, {})[version] = loaded

    def remove(self, model: str, version: int) -> LoadedVersion | None:
        """Stop addressing a version; the caller retires it."""
        versions = self._models.get(model, {})
        loaded = versions.pop(version, None)
        if loaded is not None:
            loaded.set_shadow(None)
        if not versions:
            self._models.pop(model, None)
        if self._promoted.get(model) == version:
            del self._promoted[model]
        return loaded

    def promote(self, model: str, version: int) -> None:
        """Serve ``version`` for requests naming none, even if a higher one is loaded.

        Raises:
            ModelNotFound: not loaded.
        """
        self.get(model, version)
        self._promoted[model] = version

    def promoted(self, model: str) -> int | None:
        """The promoted version of ``model``, if any."""
        return self._promoted.get(model)

    def shadow(self, model: str) -> Shadow | None:
        """The shadow profile of ``model``, if any."""
        return self._shadows.get(model)

    def shadows(self) -> list[Shadow]:
        """Every loaded shadow profile."""
        return [self._shadows[m] for m in sorted(self._shadows)]

    def set_shadow(self, model: str, shadow: Shadow | None) -> Shadow | None:
        """Make ``shadow`` score every batch of ``model``'s loaded versions (None: stop);
        returns the shadow it replaces, for the caller to retire."""
        old = self._shadows.pop(model, None)
        if shadow is not None:
            self._shadows[model] = shadow
        for loaded in self._models.get(model, {}).values():
            loaded.set_shadow(shadow)
        return old


Loader = Callable[[VersionEntry], Awaitable[LoadedVersion]]
ShadowLoader = Callable[[VersionEntry], Awaitable[Shadow]]


class Reconciler:
    """Makes a :class:`ModelTable` follow the repository's scans under a version policy.

    Args:
        table: the table to update.
        policy: which versions to load.
        load: loads and warms up one version (raises on failure).
        pool: the weights pool the retired versions give their weights back to.
        metrics: load failures, weight loads, swaps.
        retire_timeout_s: how long a retired version's requests may take before it unloads.
        load_shadow: loads one version as a shadow profile (None: shadows are not loaded).
    """

    def __init__(
        self,
        table: ModelTable,
        policy: VersionPolicy,
        load: Loader,
        pool: WeightsPool,
        metrics: RepositoryMetrics,
        retire_timeout_s: float,
        load_shadow: ShadowLoader | None = None,
    ) -> None:
        self.table = table
        self._load_shadow = load_shadow
        self.policy = policy
        self._load = load
        self._pool = pool
        self._metrics = metrics
        self._retire_timeout_s = retire_timeout_s
        self._failed: dict[tuple[str, int], tuple[tuple[str, int, int], ...]] = {}
        self._reported: set[str] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self.last_error: Exception | None = None

    def _report(self, line: str, key: tuple[str, int] | None = None) -> None:
        """Log a problem once (a poll sees the same problem every period)."""
        if line in self._reported:
            return
        self._reported.add(line)
        log.error("%s", line)
        if key is not None:
            self._metrics.load_failed(key[0], key[1], "invalid")

    async def initial(self, scan: Scan, settings: Settings) -> None:
        """The start-up scan: load what the policy wants.

        Raises:
            Exception: nothing valid to serve (with a single ``profile``: why it failed).
        """
        await self.apply(scan)
        s = settings
        if not self.table:
            if s.repository is None and self.last_error is not None:
                raise self.last_error
            where = s.repository if s.repository is not None else s.profile
            raise BundleError(f"{where}: no valid model to serve (each problem is logged above)")
        if s.default_model is not None and s.default_model not in self.table.models():
            log.error("default_model %r is not served; requests naming no model go to %r",
                      s.default_model, self.table.default)  # fmt: skip

    def refused(self, model: str, version: int, line: str) -> None:
        """Log and count a version refused before loading (an admin load of a bad bundle)."""
        log.error("%s version %d refused: %s", model, version, line)
        self._metrics.load_failed(model, version, "invalid")

    def swapped(self, model: str) -> None:
        """Count a change of the served version made from outside (a promotion)."""
        self._metrics.swapped(model)
        log.info("%s: serving version %s", model, self.table.served_version(model))

    async def apply(self, scan: Scan, *, unload_missing: bool = True) -> None:
        """Load what the policy wants from ``scan`` and retire what it no longer wants."""
        async with self._lock:
            for line in scan.problems:
                self._report(line)
            for key, line in scan.refused.items():
                self._report(line, key)
            for model, entries in scan.models.items():
                shadow = scan.shadows.get(model)
                primary = [e for e in entries if e.version != shadow]
                await self._apply_model(model, primary, unload_missing=unload_missing)
                await self._apply_shadow(model, entries, shadow, unload_missing=unload_missing)
            if unload_missing:
                for model in set(self.table.models()) - set(scan.models):
                    if not any(k[0] == model for k in scan.refused):
                        log.warning("model %s is gone from the repository: unloading", model)
                        self.drop_shadow(model)
                        for version in list(self.table.versions(model)):
                            self.retire(model, version)

    async def _apply_model(
        self, model: str, entries: list[VersionEntry], *, unload_missing: bool
    ) -> None:
        by_version = {e.version: e for e in entries}
        while True:
            # A refused version is tried again only once its files change.
            usable = [e.version for e in entries if self._failed.get(e.key) != e.signature]
            wanted = self.policy.select(usable)
            missing = [v for v in wanted if v not in self.table.versions(model)]
            if not missing:
                break
            # Newest first: it is the one that will be served. A failure changes `usable`.
            await self.load(by_version[missing[-1]])
        if not wanted:
            return  # nothing usable: keep whatever still serves
        for version in list(self.table.versions(model)):
            if version not in wanted and (unload_missing or version in by_version):
                self.retire(model, version)

    async def _apply_shadow(
        self, model: str, entries: list[VersionEntry], wanted: int | None, *, unload_missing: bool
    ) -> None:
        current = self.table.shadow(model)
        new = current is None or current.entry.version != wanted
        entry = next((e for e in entries if e.version == wanted), None)
        if entry is None or wanted in self.table.versions(model):
            if wanted is not None:  # e.g. its folder was moved to a new version number
                why = "not a valid version" if entry is None else "served as a primary"
                self._report(f"{model}: the shadow file names version {wanted}, {why}; no shadow")
            if current is not None and unload_missing:
                self.drop_shadow(model)
        elif new and self._failed.get(entry.key) != entry.signature:  # not refused as is
            await self.load_shadow(entry)

    async def load_shadow(self, entry: VersionEntry) -> bool:
        """Load ``entry`` as its model's shadow profile (replacing the current one); False
        (logged, counted) when it fails or shadows are off."""
        if self._load_shadow is None:
            return False
        try:
            shadow = await self._load_shadow(entry)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.last_error = exc
            self._failed[entry.key] = entry.signature
            log.error("shadow %s/%d refused: %s", entry.model, entry.version, exc,
                      exc_info=not isinstance(exc, BundleError))  # fmt: skip
            self._metrics.load_failed(entry.model, entry.version, "load")
            return False
        self._failed.pop(entry.key, None)
        if (old := self.table.set_shadow(entry.model, shadow)) is not None:
            self._retire_shadow(old)
        self._metrics.set_loaded(entry.model, entry.version, "shadow", True)
        log.info("shadow %s loaded: scoring every computed image of %s", shadow.name, entry.model)
        return True

    def drop_shadow(self, model: str) -> bool:
        """Stop shadowing ``model`` and unload its shadow; False when it has none."""
        if (old := self.table.set_shadow(model, None)) is not None:
            self._retire_shadow(old)
        return old is not None

    def _retire_shadow(self, shadow: Shadow) -> None:
        model, version = shadow.entry.key
        current = self.table.shadow(model)
        if current is None or current.entry.version != version:
            self._metrics.set_loaded(model, version, "shadow", False)
        task = asyncio.create_task(shadow.retire(self._pool), name="nacguard-retire-shadow")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def load(self, entry: VersionEntry) -> bool:
        """Load ``entry`` and add it to the table; False (logged, counted) when it fails."""
        before = self.table.served_version(entry.model)
        try:
            loaded = await self._load(entry)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.last_error = exc
            self._failed[entry.key] = entry.signature
            log.error(
                "model %s version %d refused, %s: %s",
                entry.model,
                entry.version,
                f"still serving version {before}" if before is not None else "not served",
                exc,
                exc_info=not isinstance(exc, BundleError),
            )
            self._metrics.load_failed(entry.model, entry.version, "load")
            return False
        self._failed.pop(entry.key, None)
        self.table.add(loaded)
        self._metrics.set_loaded(entry.model, entry.version, "primary", True)
        after = self.table.served_version(entry.model)
        if before is not None and after != before:
            self._metrics.swapped(entry.model)
        log.info(
            "loaded %s/%s%s; serving version %s",
            entry.model,
            entry.version,
            " (profile only: weights shared)" if loaded.weights_reused else "",
            after,
        )
        return True

    def retire(self, model: str, version: int) -> None:
        """Stop addressing a version now; unload it once its requests are answered."""
        loaded = self.table.remove(model, version)
        if loaded is None:
            return
        self._metrics.set_loaded(model, version, "primary", False)
        task = asyncio.create_task(
            loaded.retire(self._pool, self._retire_timeout_s), name=f"nacguard-retire-{model}"
        )
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def poll(self, rescan: Callable[[], Awaitable[None]], interval_s: float) -> None:
        """Call ``rescan`` every ``interval_s`` until cancelled; a failure is logged, not
        fatal (what is loaded keeps serving)."""
        while True:
            await asyncio.sleep(interval_s)  # a period, not a wait for an event
            try:
                await rescan()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("repository poll failed; serving what is loaded")

    async def close(self) -> None:
        """Wait for the versions being retired."""
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
