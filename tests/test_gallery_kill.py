"""The real `deepemd retrieval index` CLI SIGKILLed at several points of an incremental update, and
two writers at once: the previous gallery must keep searching with identical results, the killed
update must resume to the gallery a fresh build gives, and a second writer gets one clear error.

The CLI runs in a subprocess through a small wrapper that only makes the gallery's chunks small
(4 rows, so an update has several commits) and sleeps after each durable step (a chunk, the
index, the verification before the swap), so the test can kill it at a known step by watching
the staging folder. Everything else is the shipped code path: ``deepemd.cli.main``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import make_class_folders, write_image
from test_gallery_transactions import MODEL, files, index, same_results, search

pytestmark = pytest.mark.slow

WRAPPER = textwrap.dedent("""
    import os, sys, time
    from deepemd.retrieval import gallery
    import deepemd.retrieval.store as store

    pause = float(os.environ.get("DEEPEMD_TEST_PAUSE", "0"))
    gallery.CHUNK_SIZE = 4

    gate = os.environ.get("DEEPEMD_TEST_GATE")

    def slowly(fn):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            time.sleep(pause)
            while gate and not os.path.exists(gate):  # hold here until the test opens the gate
                time.sleep(0.01)
            return result
        return wrapped

    store.LocalFeatureStore._commit_chunk = slowly(store.LocalFeatureStore._commit_chunk)
    gallery.faiss_index.save_index = slowly(gallery.faiss_index.save_index)
    gallery._verify_staging = slowly(gallery._verify_staging)
    from deepemd.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def argv(data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-c",
        WRAPPER,
        "retrieval",
        "index",
        "--layout",
        "folder",
        "--data-root",
        str(data),
        "--split",
        "all",
        "--out",
        str(out),
        "--backbone",
        MODEL["backbone"],
        "--weights",
        MODEL["weights"],
        "--image-size",
        str(MODEL["image_size"]),
        "--pyramid",
        *map(str, MODEL["pyramid"]),
        "--batch-size",
        str(MODEL["batch_size"]),
    ]


def env(pause: float, gate: Path | None = None) -> dict[str, str]:
    extra = {"DEEPEMD_TEST_GATE": str(gate)} if gate else {}
    return {**os.environ, "DEEPEMD_TEST_PAUSE": str(pause), "OMP_NUM_THREADS": "1", **extra}


def staged_chunks(staging: Path) -> int:
    try:
        return len(json.loads((staging / "local" / "manifest.json").read_text())["chunks"])
    except (OSError, ValueError, KeyError):
        return 0


KILL_POINTS = {
    "after 2 chunks": lambda s: staged_chunks(s) >= 2,
    "index saved": lambda s: (s / "index.faiss.json").exists(),
    "verified, before the swap": lambda s: (s / "gallery.json").exists(),
}


def kill_when(cmd: list[str], reached, staging: Path, timeout: float = 120) -> None:
    proc = subprocess.Popen(cmd, env=env(0.4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not reached(staging):
            assert proc.poll() is None, f"index ended before the kill point: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


def test_killed_incremental_index_keeps_the_previous_gallery_and_resumes(tmp_path, monkeypatch):
    from deepemd.retrieval import gallery

    monkeypatch.setattr(gallery, "CHUNK_SIZE", 4)  # as in the wrapper
    data = make_class_folders(tmp_path / "data", [f"class_{c}" for c in "abc"], 4)
    out = tmp_path / "g"
    index(data, out)
    before = search(out, data / "class_a", tmp_path / "s0")
    snapshot = files(out)
    for i in range(5):  # the update: 17 images, 5 of them new (5 chunks of 4)
        write_image(data / ("class_b" if i % 2 else "class_d") / f"new{i}.png", seed=300 + i)
    staging = out.parent / ".g.staging"
    for name, reached in KILL_POINTS.items():
        kill_when(argv(data, out), reached, staging)
        assert files(out) == snapshot, name
        assert search(out, data / "class_a", tmp_path / "s1") == before, name
    chunks = staged_chunks(staging)
    resumed = index(data, out)  # resumes the staging folder the kills left
    assert chunks >= 2 and resumed["embedded"] + resumed["reused"] == max(0, 17 - 4 * chunks)
    assert not staging.exists()
    fresh = tmp_path / "fresh"
    index(data, fresh)
    same_results(search(out, data / "class_b", tmp_path / "s2"), search(fresh, data / "class_b", tmp_path / "s3"))
    assert (out / "ids.txt").read_bytes() == (fresh / "ids.txt").read_bytes()


def test_two_writers_at_once_one_wins_the_other_gets_one_clear_error(tmp_path):
    data = make_class_folders(tmp_path / "data", [f"class_{c}" for c in "ab"], 4)
    other = make_class_folders(tmp_path / "other", [f"class_{c}" for c in "xyz"], 3)
    out = tmp_path / "g"
    gate = tmp_path / "gate"
    first = subprocess.Popen(
        argv(data, out), env=env(0, gate), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while staged_chunks(out.parent / ".g.staging") < 1:  # the first writer holds the lock
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        second = subprocess.run(argv(other, out), env=env(0), capture_output=True, text=True, timeout=180, check=False)
        assert first.poll() is None, "the first writer must still be running"
        gate.touch()
        _, first_err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2 and "Traceback" not in second.stderr
    message = second.stderr[second.stderr.index("deepemd: error:") :]
    assert "another deepemd run is writing this gallery" in message and f'"pid": {first.pid}' in message
    assert len(message.strip().splitlines()) <= 2
    rows = search(out, data / "class_a", tmp_path / "s")  # the winner's gallery, complete
    assert {Path(p).parent.name for _, _, p, _ in rows} <= {"class_a", "class_b"}
    assert len((out / "ids.txt").read_text().splitlines()) == 8
