"""deepemd.io: atomic writes never leave a torn file, get the umask's mode, and turn file-system
failures into one clear error; checkpoints load weights-only or explain."""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from deepemd.errors import DeepEMDError
from deepemd.io import (
    atomic_path,
    check_output_folder,
    load_checkpoint,
    load_state_dict_checked,
    output_folder,
    save_checkpoint,
)


def test_atomic_path_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
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


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_files_get_the_umask_mode_not_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "new" / "f.txt") as tmp:
            tmp.write_text("x")
        save_checkpoint({"w": torch.zeros(2)}, tmp_path / "new" / "ck.pt")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "new" / "f.txt") == _mode(tmp_path / "new" / "ck.pt") == 0o666 & ~umask
    assert _mode(tmp_path / "new") == 0o777 & ~umask


def test_output_path_blocked_by_a_file_or_a_folder(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    with pytest.raises(DeepEMDError, match="notes.txt: --out names an existing file"):
        output_folder(blocker)
    with pytest.raises(DeepEMDError, match="notes.txt: --out lies under a file"):
        with atomic_path(blocker / "sub" / "f.txt") as tmp:
            tmp.write_text("x")
    folder = tmp_path / "results.csv"
    folder.mkdir()
    with pytest.raises(DeepEMDError, match=r"results.csv: cannot create or write it \(Is a directory\)") as err:
        with atomic_path(folder) as tmp:
            tmp.write_text("x")
    assert "fix: a folder stands where a file is written" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "results.csv"]  # no temp file left


def test_check_output_folder_creates_nothing(tmp_path):
    assert check_output_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_keeps_the_old_file(tmp_path):
    target = tmp_path / "index.faiss"
    target.write_text("old")
    with pytest.raises(DeepEMDError, match="index.faiss: cannot create or write it .No space left on device.") as err:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert "fix: the disk is full" in str(err.value) and target.read_text() == "old"
    other = tmp_path / "input.bin"
    with pytest.raises(FileNotFoundError):  # an error about some other file is not dressed up as ours
        with atomic_path(target) as tmp:
            other.read_bytes()


def _as_nobody(script: str, folder: Path) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter as user nobody (root may write anywhere)."""
    command = [sys.executable, "-c", textwrap.dedent(script)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv (util-linux) is missing, so the test cannot drop root")
        try:
            user = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("no user 'nobody' on this machine")
        command = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, cwd=folder, timeout=120, check=False)


def test_another_user_reads_what_the_umask_allows_and_cannot_write_a_locked_folder():
    shared = Path(tempfile.mkdtemp(prefix="deepemd-io-"))  # not under pytest's private tmp folder
    try:
        shared.chmod(0o755)
        old = os.umask(0o022)
        try:
            with atomic_path(shared / "ids.txt") as tmp:
                tmp.write_text("a.png\n")
        finally:
            os.umask(old)
        locked = shared / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        done = _as_nobody(
            f"""
            from pathlib import Path
            from deepemd.errors import DeepEMDError
            from deepemd.io import atomic_path
            print(Path({str(shared / "ids.txt")!r}).read_text().strip())
            try:
                with atomic_path(Path({str(locked / "out" / "f.txt")!r})) as tmp:
                    tmp.write_text("x")
            except DeepEMDError as exc:
                print(exc)
            """,
            shared,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "a.png"  # a file written by root with umask 022 is readable by others
        assert lines[1] == f"{locked}: --out cannot be created or written by this user (permission denied)"
        assert lines[2] == "fix: give this user the access it needs (chmod / chown), or choose a path it may use"
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.slow
def test_a_gallery_built_by_root_is_searched_by_another_user():
    """Finding 9 end to end: ``index`` under umask 022, then ``search`` as user nobody."""
    from cli_bad_inputs import LITE0, _images

    from deepemd.cli import main

    shared = Path(tempfile.mkdtemp(prefix="deepemd-io-"))
    try:
        shared.chmod(0o755)
        gallery = shared / "gallery"
        old = os.umask(0o022)
        try:
            code = main(
                [
                    "retrieval",
                    "index",
                    "--layout",
                    "folder",
                    "--data-root",
                    str(_images(shared / "data")),
                    *LITE0,
                    "--split",
                    "all",
                    "--out",
                    str(gallery),
                ]
            )
        finally:
            os.umask(old)
        assert code == 0
        files = [p for p in gallery.rglob("*") if p.is_file()]
        assert files and {oct(_mode(p)) for p in files} == {oct(0o644)}
        writable = shared / "theirs"
        writable.mkdir(mode=0o777)
        writable.chmod(0o777)
        query = shared / "data" / "class0" / "0.png"
        done = _as_nobody(
            f"""
            import os, sys
            os.environ.update(HOME={str(writable)!r}, DEEPEMD_CACHE={str(writable / "cache")!r})
            from deepemd.cli import main
            sys.exit(main(["retrieval", "search", "--gallery", {str(gallery)!r}, *{LITE0!r},
                           "--queries", {str(query)!r}, "--top", "3", "--out", {str(writable / "out")!r}]))
            """,
            shared,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert (writable / "out" / "search.csv").is_file()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
