"""Versioned models of the service and feedback that improves them.

A :class:`ModelRegistry` holds the served models by name with a version number and the SHA-256 of each model file.
``update(name, images)`` adds confirmed-good images exactly (``partial_fit``: the moment statistics merge), refreshes
the calibration, writes the new model file atomically (every version is kept in ``MODEL_DIR/history/NAME/``) and
swaps it in; ``rollback(name)`` restores the version before. Requests in flight keep the model object they started
with, so a swap never fails them.

Calibration after an update: the thresholds of the chi2 and Hotelling rules follow from the refitted Gaussians and
the new number of training images. A conformal model keeps its calibration scores (the held-out normal scores it
was calibrated with); a fused image score keeps its map peaks too (calibrated against the smaller bank, so they err
large: conservative p-values). Appending the added images' scores under the previous model was tried and dropped: those
images are mostly false alarms, chosen *because* they scored high, so their scores push the conformal quantile up
(bottle, 40 images, FPR 0.05: threshold 13.6 -> 18.7, 3 of 63 defects missed; keeping the scores: held-out good
flag rate 0.030, every defect flagged; EXPERIMENTS.md, "Feedback updates").
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import DataError, GaussadError
from ..intake.files import write_atomic
from ..detector.model import GaussianAD, load
from .results_log import sha256

log = logging.getLogger(__name__)

MODEL_SUFFIX = ".gaussad"
HISTORY = "history"


class UpdateError(GaussadError):
    """An update or rollback that cannot be done (nothing to apply, no earlier version); answered 409."""


def warm(model: GaussianAD) -> GaussianAD:
    """Score one blank image so that the backbone is built before the model serves requests."""
    model.level_scores([np.zeros((8, 8, 3), np.uint8)])
    return model


class ModelRegistry:
    """Served models by name, each with a version number and its file's SHA-256; thread-safe updates."""

    def __init__(self, models: Mapping[str, GaussianAD], folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else None
        self._locks = {name: threading.Lock() for name in models}
        self.versions: dict[str, dict] = {name: self._read_versions(name) for name in models}
        # name -> (model, version, sha256), replaced as one tuple so that a reader never sees a mix of two versions
        self.served: dict[str, tuple[GaussianAD, int, str]] = {
            name: (model, self.version(name), self.sha(name)) for name, model in models.items()}

    @property
    def models(self) -> dict[str, GaussianAD]:
        return {name: entry[0] for name, entry in self.served.items()}

    def current(self, name: str) -> tuple[GaussianAD, int, str]:
        """The served model, its version and its file's SHA-256, read together."""
        return self.served[name]

    # ----- files -----------------------------------------------------------------------------------------------
    def model_file(self, name: str) -> Path:
        return self.folder / f"{name}{MODEL_SUFFIX}"

    def history_dir(self, name: str) -> Path:
        return self.folder / HISTORY / name

    def _versions_file(self, name: str) -> Path:
        return self.history_dir(name) / "versions.json"

    def _read_versions(self, name: str) -> dict:
        if self.folder is None:
            return {"current": 1, "stack": [1], "versions": {"1": {"sha256": "unsaved", "time": time.time(), "added": 0}}}
        digest = sha256(self.model_file(name).read_bytes())
        path = self._versions_file(name)
        if path.exists():
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
                current = int(doc["current"])
                if doc["versions"][str(current)]["sha256"] == digest and doc["stack"][-1] == current:
                    return doc
                log.warning("%s: the model file is not the version the history names; counting it as a new version",
                            self.model_file(name))
                new = max(map(int, doc["versions"])) + 1
                doc["versions"][str(new)] = {"sha256": digest, "time": time.time(), "added": 0}
                doc["stack"].append(new)
                doc["current"] = new
                return doc
            except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
                return self._restart_history(name, digest, f"{type(exc).__name__}: {exc}")
        return {"current": 1, "stack": [1], "versions": {"1": {"sha256": digest, "time": time.time(), "added": 0}}}

    def _restart_history(self, name: str, digest: str, reason: str) -> dict:
        """A new history after a damaged ``versions.json``: the damaged file is kept aside, and numbering goes on after
        the highest ``vN`` file in the history folder, so that no earlier version's file is ever overwritten."""
        path, folder = self._versions_file(name), self.history_dir(name)
        highest = max((int(m.group(1)) for f in folder.glob(f"v*{MODEL_SUFFIX}")
                       if (m := re.fullmatch(rf"v(\d+){re.escape(MODEL_SUFFIX)}", f.name))), default=0)
        aside = path.with_name(f"versions.json.damaged-{int(time.time())}")
        try:
            path.rename(aside)
        except OSError:
            aside = path
        first = highest + 1
        log.warning("%s: unreadable version history (%s), kept as %s; the served model is version %d of a new history",
                    path, reason, aside.name, first)
        return {"current": first, "stack": [first],
                "versions": {str(first): {"sha256": digest, "time": time.time(), "added": 0}}}

    def version(self, name: str) -> int:
        return int(self.versions[name]["current"])

    def sha(self, name: str) -> str:
        v = self.versions[name]
        return v["versions"][str(v["current"])]["sha256"]

    def info(self, name: str) -> dict:
        v = self.versions[name]
        return {"version": int(v["current"]), "sha256": self.sha(name), "previous": v["stack"][-2] if len(v["stack"]) > 1 else None,
                "history": [{"version": int(k), **e} for k, e in sorted(v["versions"].items(), key=lambda kv: int(kv[0]))]}

    def _need_folder(self) -> None:
        if self.folder is None:
            raise UpdateError("models not served from a folder cannot be updated")

    # ----- update and rollback -----------------------------------------------------------------------------------
    def _served_bytes(self, name: str) -> bytes:
        """The model file's bytes, when they still are the served version (an update builds on them, a rollback
        replaces them); :class:`UpdateError` when the file was replaced on disk since it was loaded (refitted in
        place, copied over): building on it would record another model as "from" the served version, and rolling
        back would drop it unseen. A restart serves the replaced file (a new version when a history exists)."""
        file = self.model_file(name)
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise UpdateError(f"model {name!r}: cannot read {file} ({exc.strerror or exc}); nothing was changed") from None
        if sha256(data) != self.sha(name):
            raise UpdateError(f"model {name!r}: {file} is no longer the served version {self.version(name)} (replaced "
                              "on disk since it was loaded; its SHA-256 differs); restart the service to serve the new "
                              "file, or put the served file back; nothing was changed")
        return data

    def _check_writable(self, name: str) -> Path:
        """The history folder of ``name``, made; :class:`UpdateError` when it or the model folder cannot be written
        (a file in the way, a read-only folder), found before any work."""
        history = self.history_dir(name)
        try:
            history.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UpdateError(f"model {name!r}: cannot keep its versions in {history} "
                              f"({exc.strerror or exc}); nothing was changed") from None
        for folder, what in ((history, "its versions"), (self.folder, "its model file")):
            if not os.access(folder, os.W_OK | os.X_OK):  # EROFS too, for root as well
                raise UpdateError(f"model {name!r}: cannot write {what} into {folder} (read-only or permission "
                                  "denied); nothing was changed")
        return history

    def _commit(self, name: str, old: bytes, doc: dict, write_new: Callable[[], bytes]) -> bytes:
        """Write a new version: ``write_new()`` (returns the new model file's bytes), the model file, then the
        version history ``doc``. A write that fails (read-only, full disk) undoes the model file and answers
        :class:`UpdateError` (409): the served version, its file and its history stay as they were."""
        file = self.model_file(name)
        try:
            data = write_new()
            write_atomic(file, data, "model file")
            try:
                write_atomic(self._versions_file(name), json.dumps(doc, indent=1).encode(), "version history")
            except GaussadError:
                write_atomic(file, old, "model file")
                raise
        except GaussadError as exc:
            raise UpdateError(f"model {name!r}: {exc}; nothing was changed") from None
        return data

    def update(self, name: str, images: Sequence[str | os.PathLike]) -> dict:
        """Add ``images`` (confirmed good) to model ``name`` and serve the result as a new version (blocking)."""
        self._need_folder()
        if not images:
            raise UpdateError(f"model {name!r}: no good-marked images to apply")
        with self._locks[name]:
            v = self.versions[name]
            current, file = int(v["current"]), self.model_file(name)
            old = self._served_bytes(name)
            history = self._check_writable(name)
            fresh = load(file)  # a copy: the served object is never changed while requests use it
            cal, method, peaks = (fresh.state_.calibration_scores, fresh.state_.calibration_method,
                                  fresh.state_.map_calibration)
            fresh.partial_fit(list(images))  # drops the calibration scores (and a fused score's map peaks)
            if cal is not None:  # kept: see the module's docstring
                fresh.state_ = fresh.state_.with_calibration(cal, method).with_map_calibration(peaks)
            warm(fresh)
            kept = history / f"v{current}{MODEL_SUFFIX}"
            new = max(map(int, v["versions"])) + 1
            new_file = history / f"v{new}{MODEL_SUFFIX}"
            doc = copy.deepcopy(v)  # changed in memory only once every file is written
            doc["stack"].append(new)
            doc["current"] = new
            doc["versions"][str(new)] = {"sha256": None, "time": time.time(), "added": len(images), "from": current}

            def write_new() -> bytes:
                if not kept.exists():
                    write_atomic(kept, old, "model version")
                fresh.save(new_file)
                data = new_file.read_bytes()
                doc["versions"][str(new)]["sha256"] = sha256(data)
                return data

            try:
                data = self._commit(name, old, doc, write_new)
            except UpdateError:
                with contextlib.suppress(OSError):  # a read-only folder may refuse even that
                    new_file.unlink(missing_ok=True)
                raise
            self.versions[name] = doc
            self.served[name] = (fresh, new, sha256(data))
            log.info("model %s: version %d with %d added image(s) (was %d)", name, new, len(images), current)
            return {"model": name, "version": new, "previous": current, "added": len(images),
                    "n_samples": int(fresh.n_samples_), "sha256": sha256(data)}

    def rollback(self, name: str) -> dict:
        """Serve the version before the current one again (its file restored byte for byte)."""
        self._need_folder()
        with self._locks[name]:
            v = self.versions[name]
            if len(v["stack"]) < 2:
                raise UpdateError(f"model {name!r}: version {v['current']} has no earlier version to roll back to")
            dropped, previous = v["stack"][-1], v["stack"][-2]
            old = self._served_bytes(name)
            kept = self.history_dir(name) / f"v{previous}{MODEL_SUFFIX}"
            if not kept.exists():
                raise DataError(f"{kept}: the file of version {previous} is missing")
            data = kept.read_bytes()
            if sha256(data) != v["versions"][str(previous)]["sha256"]:
                raise DataError(f"{kept}: the file does not match the SHA-256 recorded for version {previous}")
            model = warm(load(kept))
            doc = copy.deepcopy(v)
            doc["stack"].pop()
            doc["current"] = previous
            self._commit(name, old, doc, lambda: data)
            self.versions[name] = doc
            self.served[name] = (model, previous, self.sha(name))
            log.info("model %s: rolled back from version %d to %d", name, dropped, previous)
            return {"model": name, "version": previous, "dropped": dropped, "sha256": v["versions"][str(previous)]["sha256"]}

