"""A gallery build (feature store + FAISS index) SIGKILLed mid-way resumes to the same result.

The worker below is a real separate process building a store chunk by chunk (a seeded producer
stands in for the network) and then the index. The test kills it with SIGKILL after a couple of
committed chunks, part-way into the next one, runs it again, and compares with a build that was
never interrupted: every chunk file byte for byte, the manifest, and the search results.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

N, CHUNK, M, DIM, VDIM = 600, 64, 5, 8, 16

WORKER = textwrap.dedent(f"""
    import sys, time
    import faiss, numpy as np
    from deepemd.retrieval.store import build_store
    from deepemd.retrieval.index import build_index_from_store, save_index, load_index, search

    faiss.omp_set_num_threads(1)
    folder, delay = sys.argv[1], float(sys.argv[2])
    fingerprint = {{"backbone": "toy", "embed_dim": {VDIM}}}

    def produce(start, stop):  # a pure function of the range, like a network over fixed images
        rng = np.random.default_rng(start)
        time.sleep(delay)
        vectors = rng.standard_normal((stop - start, {VDIM})).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors, rng.standard_normal((stop - start, {M}, {DIM})).astype(np.float16)

    def committed(rows):
        print("committed", rows, flush=True)

    store = build_store(folder + "/store", {N}, produce, {M}, {DIM}, fingerprint, chunk_size={CHUNK},
                        vector_dim={VDIM}, progress=False, on_commit=committed)
    index = build_index_from_store(store, "IVF8,Flat", train_sample=300, seed=0, nprobe=3)
    save_index(index, folder + "/gallery.faiss", fingerprint)
    queries = np.random.default_rng(123).standard_normal((20, {VDIM})).astype(np.float32)
    scores, ids = search(load_index(folder + "/gallery.faiss", fingerprint), queries, 10)
    np.save(folder + "/ids.npy", ids); np.save(folder + "/scores.npy", scores)
    print("done", flush=True)
""")


def run_worker(folder, delay: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WORKER, str(folder), str(delay)], capture_output=True, text=True, timeout=180, check=True
    )


def kill_after_commits(folder, commits: int, extra_delay: float) -> None:
    """Start the worker, wait for ``commits`` committed chunks, sleep into the next chunk, SIGKILL."""
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(folder), "0.3"], stdout=subprocess.PIPE, text=True)
    try:
        seen = 0
        for line in proc.stdout:
            if line.startswith("committed"):
                seen += 1
                if seen == commits:
                    break
        assert seen == commits, "worker ended before it could be killed"
        time.sleep(extra_delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


def chunk_bytes(folder) -> dict[str, bytes]:
    store = folder / "store"
    return {p.name: p.read_bytes() for p in sorted(store.iterdir())}


def test_killed_build_resumes_to_identical_store_and_search(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    run_worker(reference, 0.0)

    killed = tmp_path / "killed"
    killed.mkdir()
    done = 0
    for commits, extra_delay in ((3, 0.07), (2, 0.0)):  # two kills: mid-produce, right after a commit
        kill_after_commits(killed, commits, extra_delay)
        chunks = len(json.loads((killed / "store" / "manifest.json").read_text())["chunks"])
        assert done + commits <= chunks < N // CHUNK  # it really died mid-build, after progress
        assert not (killed / "gallery.faiss").exists()
        done = chunks

    resumed = run_worker(killed, 0.0)
    first = int(resumed.stdout.split()[1])
    assert first == (done + 1) * CHUNK  # resumed after the last committed chunk, nothing redone

    assert chunk_bytes(killed) == chunk_bytes(reference)  # chunk files + manifest, byte for byte
    np.testing.assert_array_equal(np.load(killed / "ids.npy"), np.load(reference / "ids.npy"))
    np.testing.assert_array_equal(np.load(killed / "scores.npy"), np.load(reference / "scores.npy"))
    assert (killed / "gallery.faiss").read_bytes() == (reference / "gallery.faiss").read_bytes()
