"""deepemd.io: atomic writes never leave a torn file; checkpoints load weights-only or explain."""
from __future__ import annotations

import pytest
import torch

from deepemd.errors import DeepEMDError
from deepemd.io import atomic_path, load_checkpoint, load_state_dict_checked, save_checkpoint


def test_atomic_path_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def test_checkpoint_round_trip_weights_only(tmp_path):
    state = {"model": torch.nn.Linear(3, 2).state_dict(), "epoch": 4, "name": "x"}
    save_checkpoint(state, tmp_path / "ck.pt")
    back = load_checkpoint(tmp_path / "ck.pt")
    assert back["epoch"] == 4 and torch.equal(back["model"]["weight"], state["model"]["weight"])


def test_truncated_and_missing_checkpoints(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint({"w": torch.randn(100, 100)}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DeepEMDError, match="not a readable deepemd checkpoint") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    with pytest.raises(DeepEMDError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": DeepEMDError("x")}, path)  # arbitrary class: not allowed with weights_only
    with pytest.raises(DeepEMDError, match="not a readable"):
        load_checkpoint(path)


def test_mismatched_state_dict_names_file(tmp_path):
    with pytest.raises(DeepEMDError, match="does not match the model") as err:
        load_state_dict_checked(torch.nn.Linear(3, 2), torch.nn.Linear(4, 2).state_dict(), tmp_path / "m.pt")
    assert "m.pt" in str(err.value)
