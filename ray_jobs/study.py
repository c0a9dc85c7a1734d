"""Where a search's Optuna study lives, so that optuna-dashboard shows it and ``--resume`` goes on
with it (README, "the study view").

The study is Optuna's journal (``study.journal``): a file that Optuna appends to. A local or NFS
experiment folder holds it directly. An object in a bucket cannot be appended to, so for results
on object storage the journal is kept on the driver's disk (under ``SKETCH_CACHE_DIR``) and copied
whole into the experiment folder whenever Ray Tune saves the searcher's state (the copy then holds
every trial that the saved state refers to) and at the end of each run. ``--resume`` starts from
the copy, or from the driver's own file where that is the same journal further on.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path
from typing import Any

from optuna.storages import JournalStorage
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend

from ray_jobs.results import ResultsStore
from sketch_core.dataset import default_cache_dir

STUDY_FILE = "study.journal"


class CopiedJournal(BaseJournalBackend):
    """Optuna's journal in a file on this machine's disk, copied whole into the experiment folder
    by ``upload``. It pickles (into Ray Tune's saved searcher) as its experiment alone, so a search
    resumed on another machine finds its journal on that machine's disk."""

    def __init__(self, store: ResultsStore):
        self.store = store

    @cached_property
    def file(self) -> Path:
        digest = hashlib.sha256(self.store.uri().encode()).hexdigest()[:16]
        return default_cache_dir() / "studies" / f"{self.store.experiment}-{digest}" / STUDY_FILE

    @cached_property
    def _journal(self) -> JournalFileBackend:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        return JournalFileBackend(str(self.file))

    def read_logs(self, log_number_from: int):
        return self._journal.read_logs(log_number_from)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self._journal.append_logs(logs)

    def upload(self) -> None:
        if self.file.exists():
            self.store.write_bytes(STUDY_FILE, self.file.read_bytes())

    def start_new(self) -> None:
        """A new search: no journal left on this disk by an earlier experiment of the same name."""
        self.file.unlink(missing_ok=True)

    def download(self) -> None:
        """``--resume``: the experiment folder's copy, unless this disk has the same journal
        further on (a driver killed between two uploads)."""
        saved = self.store.read_bytes(STUDY_FILE) if self.store.exists(STUDY_FILE) else b""
        here = self.file.read_bytes() if self.file.exists() else b""
        if not here.startswith(saved):
            self.file.parent.mkdir(parents=True, exist_ok=True)
            self.file.write_bytes(saved)

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store}


class Study:
    """A search's Optuna storage, on the experiment folder or copied into it."""

    def __init__(self, store: ResultsStore):
        self.store = store
        self.copied = CopiedJournal(store) if store.scheme else None

    @property
    def view(self) -> str:
        """The journal file that optuna-dashboard shows live: in the experiment folder, or the
        driver's working copy."""
        return str(self.copied.file) if self.copied else self.store.uri(STUDY_FILE)

    def view_command(self) -> str:
        command = f"optuna-dashboard {self.view}"
        return command + (f"   (copied to {self.store.uri(STUDY_FILE)})" if self.copied else "")

    def storage(self) -> JournalStorage:
        if self.copied:
            return JournalStorage(self.copied)
        Path(self.view).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(self.view))

    def start_new(self) -> None:
        if self.copied:
            self.copied.start_new()

    def prepare_resume(self) -> None:
        if self.copied:
            self.copied.download()

    def upload(self) -> None:
        if self.copied:
            self.copied.upload()
