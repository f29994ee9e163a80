"""``torchrun --nproc-per-node 2`` (gloo, CPU) gives the results of one process, and resumes with
ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image

from vit_embedding_lens.cli import main
from vit_embedding_lens.runner import load_results
from vit_embedding_lens.runner.manifest import read_manifest, write_manifest
from vit_embedding_lens.runner.storage import batch_ids_on_disk, batch_path
from vit_embedding_lens.zoo import load_mnist_eval

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8


def digit_folder(root: Path, per_class: int = 6) -> Path:
    data = load_mnist_eval()
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(data.raw[50 * c + k]).save(root / str(c) / f"{k:02d}.png")
    return root


def analyze_args(data: Path, out: Path) -> list:
    return [
        "analyze",
        "--model",
        "bundled:mnist-vit",
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        str(BATCH),
        "--device",
        "cpu",
        "--no-progress",
        "--no-report",
    ]


def torchrun(
    data: Path, out: Path, nproc: int = 2, args: Optional[list] = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "vit_embedding_lens",
        *(args if args is not None else analyze_args(data, out)),
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def assert_bitwise_equal(a, b):
    assert np.array_equal(a.index, b.index) and list(a.image_ids) == list(b.image_ids)
    assert a.analyses == b.analyses
    for name in a.analyses:
        for key, value in a.arrays[name].items():
            assert value.tobytes() == b.arrays[name][key].tobytes(), f"{name}/{key}"


def single_process(data: Path, out: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun's workers run with OMP_NUM_THREADS=1
    try:
        assert main(analyze_args(data, out)) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_and_resume_with_ranks(tmp_path):
    data = digit_folder(tmp_path / "digits")
    proc = torchrun(data, tmp_path / "ranks")
    assert proc.returncode == 0, proc.stderr[-4000:]
    single_process(data, tmp_path / "single")
    ranked, single = load_results(tmp_path / "ranks"), load_results(tmp_path / "single")
    assert len(ranked) == 60 and np.array_equal(ranked.index, np.arange(60))
    assert_bitwise_equal(ranked, single)
    manifest = read_manifest(tmp_path / "ranks")
    assert manifest["status"] == "complete" and manifest["attempts"][-1]["world_size"] == 2

    # an interrupted run resumed under torchrun: the ranks share the missing batches
    out = tmp_path / "ranks"
    for b in (1, 4, 6):
        batch_path(out, b).unlink()
    manifest["status"] = "running"
    write_manifest(out, manifest)
    proc = torchrun(data, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    attempt = read_manifest(out)["attempts"][-1]
    assert attempt == {**attempt, "world_size": 2, "pending_batches": 3}
    assert_bitwise_equal(load_results(out), single)

    # and a two-rank run resumed by one process (a different world size)
    for b in (0, 7):
        batch_path(out, b).unlink()
    single_process(data, out)
    assert read_manifest(out)["attempts"][-1]["pending_batches"] == 2
    assert batch_ids_on_disk(out) == list(range(8))
    assert_bitwise_equal(load_results(out), single)


@pytest.mark.slow
def test_demo_under_torchrun_shares_the_work_and_equals_one_process(tmp_path):
    """Two ranks of ``vit-lens demo`` write one folder together (rank 0 holds the lock, both
    compute batches, rank 0 merges and reports) and give the one-process demo's results."""

    def demo(out: Path) -> list:  # --n-images: torchrun's own parser takes --n for its --nnodes
        return [
            "demo",
            "--n-images",
            "120",
            "--out",
            str(out),
            "--batch-size",
            "64",
            "--device",
            "cpu",
            "--no-progress",
            "--analyses",
            "accuracy,context_removal",
        ]

    proc = torchrun(tmp_path, tmp_path / "ranks", args=demo(tmp_path / "ranks"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("report:") == 1  # rank 0 reports, once
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(demo(tmp_path / "single")) == 0
    finally:
        torch.set_num_threads(threads)
    ranked = load_results(tmp_path / "ranks")
    assert_bitwise_equal(ranked, load_results(tmp_path / "single"))
    manifest = read_manifest(tmp_path / "ranks")
    assert manifest["attempts"][-1]["world_size"] == 2 and manifest["report"]["files"]
    assert not (tmp_path / "ranks" / ".vit-lens.lock").exists()
