"""The run folder is safe (issue 17, 4): one writer at a time (a lock with pid and host, stale locks
taken over), and the runner touches only files it wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from vit_embedding_lens import HookedViT
from vit_embedding_lens.data import bundled_eval_dataset
from vit_embedding_lens.runner import (
    ForeignFileError,
    build_analyses,
    run_analyses,
    write_run_report,
)
from vit_embedding_lens.runner.analyses import Accuracy
from vit_embedding_lens.runner.lock import LOCK_FILE, RunFolderLockedError
from vit_embedding_lens.runner.manifest import read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return HookedViT.from_bundled()


@pytest.fixture(scope="module")
def dataset(model):
    return bundled_eval_dataset(model, n=8)


def run(model, dataset, out, analyses=("accuracy",), **kw):
    kw.setdefault("batch_size", 4)
    return run_analyses(model, dataset, list(analyses), out, progress=False, **kw)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(out, pid, host=None, token="someone-else"):
    out.mkdir(parents=True, exist_ok=True)
    lock = {"pid": pid, "host": host or socket.gethostname(), "token": token}
    (out / LOCK_FILE).write_text(json.dumps(lock))


class LockReader(Accuracy):
    """Reads the folder's lock while the run holds it."""

    seen: list = []

    def run(self, model, batch):
        LockReader.seen.append(json.loads((self.out / LOCK_FILE).read_text()))
        return super().run(model, batch)


def test_a_run_holds_the_lock_and_releases_it(model, dataset, tmp_path):
    out = tmp_path / "run"
    reader = LockReader()
    reader.out = out
    LockReader.seen = []
    run(model, dataset, out, analyses=[reader])
    assert LockReader.seen and all(
        s["pid"] == os.getpid() and s["host"] == socket.gethostname() for s in LockReader.seen
    )
    assert not (out / LOCK_FILE).exists()


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(model, dataset, tmp_path):
    out = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(out, sleeper.pid)
        with pytest.raises(RunFolderLockedError, match=rf"pid {sleeper.pid}[\s\S]*{LOCK_FILE}"):
            run(model, dataset, out)
        assert not (out / "manifest.json").exists()  # nothing was touched
    finally:
        sleeper.kill()
        sleeper.wait()
    write_lock(out, dead_pid())  # its process is gone: the lock is stale
    with pytest.warns(UserWarning, match="stale lock"):
        results = run(model, dataset, out)
    assert len(results) == len(dataset) and not (out / LOCK_FILE).exists()
    write_lock(out, 12345, host="another-host")  # cannot tell whether it lives: refused
    with pytest.raises(RunFolderLockedError, match="another-host"):
        run(model, dataset, out)


class TakenOver(Accuracy):
    """Another run takes the folder over after this run's first batch."""

    def run(self, model, batch):
        if int(batch.indices[0]) > 0:
            write_lock(self.out, os.getpid(), token="the-new-run")
        return super().run(model, batch)


def test_a_writer_that_lost_its_lock_stops_before_writing(model, dataset, tmp_path):
    out = tmp_path / "run"
    analysis = TakenOver()
    analysis.out = out
    with pytest.raises(RunFolderLockedError, match="took over"):
        run(model, dataset, out, analyses=[analysis])
    assert read_manifest(out)["finished_batches"] == [0]  # batch 1 was not written
    assert json.loads((out / LOCK_FILE).read_text())["token"] == "the-new-run"  # not released


def test_a_users_own_files_are_never_overwritten_or_deleted(model, dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.npz").write_bytes(b"the user's own results")
    with pytest.raises(ForeignFileError, match=r"results\.npz"):
        run(model, dataset, out)
    with pytest.raises(ForeignFileError, match=r"results\.npz"):
        run(model, dataset, out, overwrite=True)
    assert (out / "results.npz").read_bytes() == b"the user's own results"
    assert not (out / "manifest.json").exists()

    out = tmp_path / "run2"
    (out / "report").mkdir(parents=True)
    (out / "batches").mkdir()
    (out / "report" / "index.html").write_text("the user's page")
    (out / "report" / "notes.txt").write_text("notes")
    (out / "batches" / "mine.txt").write_text("mine")
    analyses = build_analyses(["accuracy"])
    results = run(model, dataset, out, analyses=analyses)
    with pytest.raises(ForeignFileError, match=r"report/index\.html"):
        write_run_report(out, results, analyses, model)
    assert (out / "report" / "index.html").read_text() == "the user's page"
    (out / "report" / "index.html").unlink()
    report = write_run_report(out, results, analyses, model)
    written = read_manifest(out)["report"]["files"]
    assert "report/index.html" in written and "report/tables/accuracy__summary.csv" in written
    assert report.page.is_file()
    # --overwrite removes what the runner wrote, and only that
    again = run(model, dataset, out, analyses=["accuracy"], batch_size=8, overwrite=True)
    assert len(again) == len(dataset)
    assert (out / "report" / "notes.txt").read_text() == "notes"
    assert (out / "batches" / "mine.txt").read_text() == "mine"
    assert not (out / "report" / "index.html").exists()
    assert not (out / "report" / "tables").exists()  # emptied, so removed
    assert np.load(out / "results.npz")["meta/index"].tolist() == list(range(len(dataset)))


def test_the_command_line_reports_a_locked_folder_as_a_user_error(tmp_path, capsys):
    from vit_embedding_lens.cli import main

    out = tmp_path / "demo"
    write_lock(out, os.getpid())  # a live process on this host holds it
    code = main(["demo", "--out", str(out), "--n", "4", "--no-progress", "--analyses", "accuracy"])
    assert code == 2
    assert f"pid {os.getpid()}" in capsys.readouterr().err
