"""A run killed with SIGKILL mid-way resumes to results bitwise equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.runner import load_results, run_analyses
from vit_embedding_lens.runner.manifest import read_manifest
from vit_embedding_lens.runner.storage import batch_ids_on_disk

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES, BATCH = 160, 8

#: the child: the bundled model over the bundled digits, each item slowed down so a kill lands
#: mid-run
CHILD = r"""
import os, sys, time
import torch
torch.set_num_threads(1)
from vit_embedding_lens import HookedViT
from vit_embedding_lens.data.images import bundled_eval_dataset
from vit_embedding_lens.runner import run_analyses

class Slow(torch.utils.data.Dataset):
    def __init__(self, inner, delay):
        self.inner, self.delay = inner, delay
    def __len__(self):
        return len(self.inner)
    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.inner[i]
    def fingerprint(self):
        return self.inner.fingerprint()

model = HookedViT.from_bundled()
data = Slow(bundled_eval_dataset(model, n=int(sys.argv[2])), float(sys.argv[3]))
run_analyses(
    model, data, ["accuracy", "cls_identifiability"], sys.argv[1],
    batch_size=int(sys.argv[4]), progress=False,
)
print("DONE")
"""


def child(out: Path, delay: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = [sys.executable, "-c", CHILD, str(out), str(N_IMAGES), str(delay), str(BATCH)]
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    out = tmp_path / "killed"
    proc = child(out, delay=0.05)  # ~0.4 s per batch of 8
    deadline = time.monotonic() + 240
    while len(batch_ids_on_disk(out)) < 3:
        assert proc.poll() is None, (
            f"the child ended before it could be killed:\n{proc.communicate()[1][-3000:]}"
        )
        assert time.monotonic() < deadline, "no batches written in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    written = batch_ids_on_disk(out)
    n_batches = N_IMAGES // BATCH
    assert 3 <= len(written) < n_batches, "the kill must land mid-run"
    assert read_manifest(out)["status"] == "running"

    resumed = child(out, delay=0.0)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "DONE" in stdout

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child
    try:
        from vit_embedding_lens.data.images import bundled_eval_dataset

        model = HookedViT.from_bundled()
        dataset = bundled_eval_dataset(model, n=N_IMAGES)
        reference = run_analyses(
            model,
            dataset,
            ["accuracy", "cls_identifiability"],
            tmp_path / "reference",
            batch_size=BATCH,
            progress=False,
        )
    finally:
        torch.set_num_threads(torch_threads)

    got = load_results(out)
    assert (
        np.array_equal(got.index, np.arange(N_IMAGES)) and len(got.skipped) == 0
    )  # none missing or doubled
    assert got.analyses == reference.analyses
    for name in reference.analyses:
        for key, expected in reference.arrays[name].items():
            assert got.arrays[name][key].tobytes() == expected.tobytes(), f"{name}/{key}"
    assert read_manifest(out)["finished_batches"] == list(range(n_batches))
    assert not list(out.rglob("*.tmp"))
