"""deepemd.memory: batch after batch of a conv forward (almost) stops faulting pages in (glibc Linux)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deepemd.memory import keep_freed_memory

# Minor page faults of each of six forwards of the same batch through a small conv stack: the
# pattern of a backbone over a folder, batch after batch, with activations of several MiB.
SCRIPT = """
import resource, sys, torch
from deepemd.memory import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
conv = torch.nn.Conv2d
net = torch.nn.Sequential(conv(3, 32, 3, padding=1), torch.nn.ReLU(), conv(32, 64, 3, padding=1)).eval()
x = torch.randn(16, 3, 96, 96)
faults = []
with torch.no_grad():
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        net(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, *faults)
"""


def forward_faults(mode: str) -> tuple[bool, list[int]]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True, text=True)
    took, *faults = out.stdout.split()
    return took == "True", [int(f) for f in faults]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's; elsewhere it is a no-op")
def test_steady_state_forward_takes_no_page_faults():
    took, kept = forward_faults("keep")
    _, returned = forward_faults("default")
    assert took
    activations = 16 * 64 * 96 * 96 * 4 // 4096  # pages of the last layer's output alone
    # malloc's defaults: every large activation is a fresh mmap, faulted in again each batch
    assert min(returned[3:]) > activations
    # kept: once the heap has grown to the forward's peak, its blocks are reused as they are;
    # a batch may still fault one output block in when memalign's request misses its old hole
    # (seen once, [0, 0, 9216], in a fresh venv under xdist), never more
    assert max(kept[3:]) <= activations + 64
    assert sum(kept[3:]) < sum(returned[3:]) // 3


def test_idempotent():
    first = keep_freed_memory()
    assert keep_freed_memory() == first
