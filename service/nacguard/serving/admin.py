"""The model repository's admin operations (explicit mode): load, unload, promote, roll back,
and shadow profiles (load a version as the shadow, promote the shadow, unload it).

Adapters expose them (``api/admin.py``, behind admin keys); each is one call on the event loop
and leaves the served-model table consistent whatever happens: a version that fails to load is
refused (logged, counted) and changes nothing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from nacguard.errors import BundleError, ModelNotFound, RepositoryConflict
from nacguard.serving.models import ModelTable, Reconciler
from nacguard.serving.repository import VersionEntry, read_entry

__all__ = ["RepositoryAdmin"]


class RepositoryAdmin:
    """Admin operations on a :class:`ModelTable` through its :class:`Reconciler`.

    Args:
        table: the served-model table.
        reconciler: loads and retires versions.
        root: the repository directory (``None``: a single ``profile``, nothing to load).
    """

    def __init__(self, table: ModelTable, reconciler: Reconciler, root: Path | None) -> None:
        self.table = table
        self.reconciler = reconciler
        self.root = root

    def describe(self) -> dict[str, Any]:
        """Every loaded model: its versions, the served one, the promoted one (if any)."""
        return {
            "default_model": self.table.default,
            "models": [
                {
                    "name": model,
                    "versions": versions,
                    "served": self.table.served_version(model),
                    "promoted": self.table.promoted(model),
                    "shadow": shadow.entry.version
                    if (shadow := self.table.shadow(model)) is not None
                    else None,
                }
                for model, versions in self.table.models().items()
            ],
        }

    async def _entry(self, model: str, version: int) -> VersionEntry:
        if self.root is None:
            raise ModelNotFound("no repository: serving a single profile")
        path = self.root / model / str(version)
        if not path.is_dir() or path.parent.parent != self.root:
            raise ModelNotFound(f"no folder {model}/{version} in the repository")
        try:
            entry = await asyncio.to_thread(read_entry, model, version, path)
        except BundleError as exc:
            self.reconciler.refused(model, version, str(exc))
            raise RepositoryConflict(f"refused: {exc.message}") from None
        return entry

    async def load(self, model: str, version: int) -> dict[str, Any]:
        """Load ``DIR/model/version`` (it serves at once if it is the model's highest).

        Raises:
            ModelNotFound: no such folder in the repository.
            RepositoryConflict: already loaded, or refused (invalid, failed to load or warm up).
        """
        if version in self.table.versions(model):
            raise RepositoryConflict(f"{model} version {version} is already loaded")
        entry = await self._entry(model, version)
        if not await self.reconciler.load(entry):
            raise RepositoryConflict(
                f"{model} version {version} refused: {self.reconciler.last_error}"
            )
        return self.describe()

    def unload(self, model: str, version: int) -> dict[str, Any]:
        """Unload a version once its requests are answered.

        Raises:
            ModelNotFound: not loaded.
            RepositoryConflict: it is the last loaded version of all.
        """
        self.table.get(model, version)
        if sum(len(v) for v in self.table.models().values()) == 1:
            raise RepositoryConflict("the last loaded version cannot be unloaded")
        self.reconciler.retire(model, version)
        return self.describe()

    def promote(self, model: str, version: int) -> dict[str, Any]:
        """Serve ``version`` for requests naming none.

        Raises:
            ModelNotFound: not loaded.
        """
        before = self.table.served_version(model)
        self.table.promote(model, version)
        if before != version:
            self.reconciler.swapped(model)
        return self.describe()

    def rollback(self, model: str) -> dict[str, Any]:
        """Serve the highest loaded version below the served one.

        Raises:
            ModelNotFound: model not loaded.
            RepositoryConflict: no lower version loaded.
        """
        served = self.table.get(model).entry.version
        lower = [v for v in self.table.versions(model) if v < served]
        if not lower:
            raise RepositoryConflict(f"{model}: no version below {served} is loaded")
        return self.promote(model, max(lower))

    async def shadow(self, model: str, version: int) -> dict[str, Any]:
        """Load ``DIR/model/version`` as ``model``'s shadow profile (replacing its shadow):
        it scores every image the model computes; the answers stay the primary's.

        Raises:
            ModelNotFound: the model is not served, or no such folder.
            RepositoryConflict: loaded as a primary, or refused.
        """
        self.table.get(model)
        if version in self.table.versions(model):
            raise RepositoryConflict(f"{model} version {version} is served as a primary")
        entry = await self._entry(model, version)
        if not await self.reconciler.load_shadow(entry):
            raise RepositoryConflict(
                f"{model} version {version} refused as a shadow: {self.reconciler.last_error}"
            )
        return self.describe()

    async def promote_shadow(self, model: str) -> dict[str, Any]:
        """Serve the shadow's version (loaded as a primary, sharing the shadow's weights when
        it is a profile-only change) and stop shadowing.

        Raises:
            ModelNotFound: the model has no shadow.
            RepositoryConflict: the version failed to load as a primary.
        """
        shadow = self.table.shadow(model)
        if shadow is None:
            raise ModelNotFound(f"model {model!r} has no shadow profile")
        version = shadow.entry.version
        if version not in self.table.versions(model) and not await self.reconciler.load(
            shadow.entry
        ):
            raise RepositoryConflict(f"{model} version {version}: {self.reconciler.last_error}")
        self.promote(model, version)
        self.reconciler.drop_shadow(model)
        return self.describe()

    def unload_shadow(self, model: str) -> dict[str, Any]:
        """Stop shadowing ``model`` and unload the shadow.

        Raises:
            ModelNotFound: the model has no shadow.
        """
        if not self.reconciler.drop_shadow(model):
            raise ModelNotFound(f"model {model!r} has no shadow profile")
        return self.describe()
