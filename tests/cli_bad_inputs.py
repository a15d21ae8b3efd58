"""Every bad input tried against the ``deepemd`` CLI, and the one message it gets.

``tests/test_cli_errors.py`` runs each case and checks: exit code 2, the expected phrase, the
offending file named, no traceback. ``python tests/cli_bad_inputs.py`` prints the README table
from the same cases, so the table and the tests cannot drift apart.

A case with ``as_user`` runs the CLI in a subprocess as that user (``setpriv``, when the tests run
as root, since root may write any folder), in a world-readable temporary folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

LITE0 = ["--backbone", "efficientnet_lite0", "--weights", "imagenet", "--image-size", "32"]
TINY_RESNET = ["--backbone", "resnet12", "--backbone-widths", "8", "8", "8", "8", "--image-size", "32"]


def _images(root: Path, classes: int = 4, per_class: int = 6, size: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            path = root / f"class{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return root


def _fewshot_test(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fewshot",
        "test",
        "--layout",
        "folder",
        "--data-root",
        str(root),
        *TINY_RESNET,
        "--weights",
        "none",
        "--way",
        "2",
        "--shot",
        "1",
        "--query",
        "2",
        "--episodes",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def _retrieval_eval(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "retrieval",
        "eval",
        "--layout",
        "folder",
        "--data-root",
        str(root),
        *TINY_RESNET,
        "--weights",
        "none",
        "--out",
        str(out),
        *extra,
    ]


@dataclass
class Case:
    """``make(tmp)`` builds the bad input and returns (argv, path the message must name)."""

    what: str
    make: Callable[[Path], tuple[list[str], str]]
    expect: str
    as_user: str | None = None


def _missing_folder(tmp: Path):
    root = tmp / "no-such-dataset"
    return _retrieval_eval(root, tmp / "out"), str(root)


def _missing_split_file(tmp: Path):
    root = tmp / "mini"
    (root / "images").mkdir(parents=True)
    return (
        [
            "fewshot",
            "test",
            "--layout",
            "miniimagenet",
            "--data-root",
            str(root),
            *TINY_RESNET,
            "--out",
            str(tmp / "out"),
        ],
        "split",
    )


def _corrupt_image(tmp: Path):
    root = _images(tmp / "data")
    bad = root / "class3" / "0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    return _retrieval_eval(root, tmp / "out"), str(bad)


def _truncated_image(tmp: Path):
    root = _images(tmp / "data")
    bad = root / "class3" / "1.jpg"
    Image.fromarray(np.full((64, 64, 3), 127, np.uint8)).save(bad, quality=95)
    bad.write_bytes(bad.read_bytes()[:300])
    return _retrieval_eval(root, tmp / "out"), str(bad)


def _decompression_bomb(tmp: Path):
    """A 20000 x 20000 PNG (400 MP) that compresses to a few hundred KB."""
    root = _images(tmp / "data")
    bomb = root / "class3" / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)
    return _retrieval_eval(root, tmp / "out"), str(bomb)


def _too_few_images(tmp: Path):
    root = _images(tmp / "data", classes=4, per_class=2)
    return _fewshot_test(root, tmp / "out", "--shot", "5"), "class"


def _unknown_config_key(tmp: Path):
    cfg = tmp / "exp.yaml"
    cfg.write_text("backbone: resnet12\nepisdoes: 600\n")
    return ["fewshot", "test", "--config", str(cfg)], str(cfg)


def _wrong_type(tmp: Path):
    cfg = tmp / "exp.yaml"
    cfg.write_text("way: five\n")
    return ["fewshot", "test", "--config", str(cfg)], str(cfg)


def _wrong_type_flag(tmp: Path):
    return _fewshot_test(_images(tmp / "data"), tmp / "out", "--episodes", "many"), "episodes"


def _zero_batch_size(tmp: Path):
    return _retrieval_eval(_images(tmp / "data"), tmp / "out", "--batch-size", "0"), "batch_size"


def _negative_top(tmp: Path):
    return ["retrieval", "search", "--gallery", str(tmp / "gallery"), "--top", "-3"], "top"


def _duplicate_config_key(tmp: Path):
    cfg = tmp / "exp.yaml"
    cfg.write_text("way: 5\nshot: 1\nway: 10\n")
    return ["fewshot", "test", "--config", str(cfg)], str(cfg)


def _unknown_method(tmp: Path):
    return _fewshot_test(_images(tmp / "data"), tmp / "out", "--methods", "protonett"), "protonett"


def _unknown_backbone(tmp: Path):
    return (
        [
            "retrieval",
            "eval",
            "--layout",
            "folder",
            "--data-root",
            str(_images(tmp / "data")),
            "--backbone",
            "resnet13",
            "--out",
            str(tmp / "out"),
        ],
        "resnet13",
    )


def _missing_checkpoint(tmp: Path):
    ckpt = tmp / "missing.pt"
    return _fewshot_test(_images(tmp / "data"), tmp / "out", "--weights", str(ckpt)), str(ckpt)


def _truncated_checkpoint(tmp: Path):
    import torch

    ckpt = tmp / "ckpt.pt"
    torch.save({"model": {"w": torch.randn(64, 64)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:500])
    return _fewshot_test(_images(tmp / "data"), tmp / "out", "--weights", str(ckpt)), str(ckpt)


def _mismatched_checkpoint(tmp: Path):
    """Weights of a 640-channel ResNet-12 offered to an 8-channel one."""
    import torch

    from deepemd.backbones import create

    ckpt = tmp / "other-model.pt"
    torch.save({"model": create("resnet12").state_dict()}, ckpt)
    return _fewshot_test(_images(tmp / "data"), tmp / "out", "--weights", str(ckpt)), str(ckpt)


def _gallery(tmp: Path, *extra: str) -> Path:
    from deepemd.cli import main

    out = tmp / "gallery"
    code = main(
        [
            "retrieval",
            "index",
            "--layout",
            "folder",
            "--data-root",
            str(_images(tmp / "data")),
            *LITE0,
            "--split",
            "all",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert code == 0, "building the test gallery failed"
    return out


def _index_from_other_model(tmp: Path):
    gallery = _gallery(tmp)
    query = _images(tmp / "q", classes=1, per_class=1) / "class0" / "0.png"
    return (
        [
            "retrieval",
            "search",
            "--gallery",
            str(gallery),
            "--backbone",
            "resnet12",
            "--weights",
            "none",
            "--image-size",
            "32",
            "--queries",
            str(query),
            "--out",
            str(tmp / "out"),
        ],
        str(gallery / "gallery.json"),  # where the gallery records its network options
    )


def _store_out_of_step(tmp: Path):
    gallery = _gallery(tmp)
    ids = gallery / "ids.txt"
    ids.write_text("\n".join(ids.read_text().splitlines()[:-1]) + "\n")  # one image fewer
    query = _images(tmp / "q", classes=1, per_class=1) / "class0" / "0.png"
    return (
        ["retrieval", "search", "--gallery", str(gallery), *LITE0, "--queries", str(query), "--out", str(tmp / "out")],
        str(gallery),
    )


def _empty_queries(tmp: Path):
    gallery = _gallery(tmp)
    empty = tmp / "no-queries"
    empty.mkdir()
    return (
        ["retrieval", "search", "--gallery", str(gallery), *LITE0, "--queries", str(empty), "--out", str(tmp / "out")],
        str(empty),
    )


def _out_is_a_file(tmp: Path):
    out = tmp / "results.txt"
    out.write_text("notes\n")
    return _retrieval_eval(_images(tmp / "data"), out), str(out)


def _out_under_a_file(tmp: Path):
    blocker = tmp / "notes.txt"
    blocker.write_text("notes\n")
    return _retrieval_eval(_images(tmp / "data"), blocker / "run1"), str(blocker)


def _out_not_writable(tmp: Path):
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return _retrieval_eval(_images(tmp / "data"), locked / "out"), str(locked)


def _config_not_readable(tmp: Path):
    cfg = tmp / "exp.yaml"
    cfg.write_text("way: 2\n")
    cfg.chmod(0o600)  # root's own file
    return ["fewshot", "test", "--config", str(cfg)], str(cfg)


def _image_not_readable(tmp: Path):
    root = _images(tmp / "data")
    private = root / "class3" / "2.png"
    private.chmod(0o600)
    return _fewshot_test(root, tmp / "out", "--methods", "protonet"), str(private)


def _config_out_is_a_file(tmp: Path):
    """``out`` from the YAML is checked like the flag, when the options are read (before any work)."""
    out = tmp / "results.txt"
    out.write_text("notes\n")
    cfg = tmp / "exp.yaml"
    cfg.write_text(f"out: {out}\n")
    argv = _fewshot_test(_images(tmp / "data"), out, "--methods", "protonet", "--config", str(cfg))
    del argv[argv.index("--out") : argv.index("--out") + 2]
    return argv, str(out)


def _output_file_is_a_folder(tmp: Path):
    out = tmp / "out"
    (out / "episodes.csv").mkdir(parents=True)
    return _fewshot_test(_images(tmp / "data"), out, "--methods", "protonet"), str(out / "episodes.csv")


def _pretrain_with_hierarchy(tmp: Path, rows: str, *extra: str) -> tuple[list[str], str]:
    """``fewshot pretrain --loss emd --hierarchy FILE`` on class0..class3 with the given CSV."""
    hierarchy = tmp / "hierarchy.csv"
    hierarchy.write_text(rows)
    return (
        [
            "fewshot",
            "pretrain",
            "--layout",
            "folder",
            "--data-root",
            str(_images(tmp / "data")),
            *TINY_RESNET,
            "--weights",
            "none",
            "--epochs",
            "1",
            "--val-episodes",
            "0",
            "--loss",
            "emd",
            "--hierarchy",
            str(hierarchy),
            "--out",
            str(tmp / "out"),
            *extra,
        ],
        str(hierarchy),
    )


def _hierarchy_cycle(tmp: Path):
    return _pretrain_with_hierarchy(tmp, "class0,g0\nclass1,g0\nclass2,g1\nclass3,g1\ng0,g1\ng1,g0\n")


def _hierarchy_several_roots(tmp: Path):
    return _pretrain_with_hierarchy(tmp, "class0,g0\nclass1,g0\nclass2,g1\nclass3,g1\n")


def _hierarchy_missing_class(tmp: Path):
    return _pretrain_with_hierarchy(tmp, "class0,g0\nclass2,g0\nclass3,g0\n")  # train split: class0, class1


def _hierarchy_inner_class(tmp: Path):
    return _pretrain_with_hierarchy(tmp, "class0,class1\nclass2,class1\nclass1,root\nclass3,root\n")


def _hierarchy_negative_length(tmp: Path):
    return _pretrain_with_hierarchy(
        tmp, "class,parent,edge_length\nclass0,g0,1\nclass1,g0,-2\nclass2,g0,1\nclass3,g0,1\n"
    )


def _emd_rho_not_positive(tmp: Path):
    argv, _ = _pretrain_with_hierarchy(
        tmp, "class0,g\nclass1,g\nclass2,g\nclass3,g\n", "--loss", "relaxed-emd", "--emd-rho", "0"
    )
    return argv, "emd_rho"


def _emd_loss_without_hierarchy(tmp: Path):
    argv, _ = _pretrain_with_hierarchy(tmp, "class0,g\n")
    del argv[argv.index("--hierarchy") : argv.index("--hierarchy") + 2]
    return argv, "--hierarchy"


def _gallery_search(gallery: Path, tmp: Path) -> list[str]:
    query = _images(tmp / "q", classes=1, per_class=1) / "class0" / "0.png"
    return [
        "retrieval",
        "search",
        "--gallery",
        str(gallery),
        *LITE0,
        "--queries",
        str(query),
        "--out",
        str(tmp / "out"),
    ]


def _flip_chunk_byte(gallery: Path) -> Path:
    chunk = gallery / "local" / "chunk_000000.24.npy"
    raw = bytearray(chunk.read_bytes())
    raw[-7] ^= 0x10
    chunk.write_bytes(bytes(raw))
    return chunk


def _corrupt_store_chunk(tmp: Path):
    gallery = _gallery(tmp)
    return _gallery_search(gallery, tmp), str(_flip_chunk_byte(gallery))


def _index_over_damaged_gallery(tmp: Path):
    gallery = _gallery(tmp)
    chunk = _flip_chunk_byte(gallery)
    return (
        [
            "retrieval",
            "index",
            "--layout",
            "folder",
            "--data-root",
            str(tmp / "data"),
            *LITE0,
            "--split",
            "all",
            "--out",
            str(gallery),
        ],
        str(chunk),
    )


_HELD_LOCKS: list[int] = []  # flocks held "by another process" while a case runs


def _gallery_locked(tmp: Path):
    import fcntl

    from deepemd.retrieval.transaction import lock_path

    gallery = tmp / "gallery"
    fd = os.open(lock_path(gallery), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b'{"pid": 4242, "host": "other-host", "command": "deepemd retrieval index ..."}')
    _HELD_LOCKS.append(fd)
    return (
        [
            "retrieval",
            "index",
            "--layout",
            "folder",
            "--data-root",
            str(_images(tmp / "data")),
            *LITE0,
            "--split",
            "all",
            "--out",
            str(gallery),
        ],
        str(gallery),
    )


def _newline_in_file_name(tmp: Path):
    root = _images(tmp / "data")
    odd = root / "class1" / "two\nlines.png"
    odd.write_bytes((root / "class1" / "0.png").read_bytes())
    return (
        [
            "retrieval",
            "index",
            "--layout",
            "folder",
            "--data-root",
            str(root),
            *LITE0,
            "--split",
            "all",
            "--out",
            str(tmp / "gallery"),
        ],
        "two\\nlines.png",
    )


CASES = [
    Case("missing dataset folder", _missing_folder, "not found"),
    Case("layout without its split file", _missing_split_file, "split"),
    Case("corrupt image", _corrupt_image, "image"),
    Case("truncated JPEG", _truncated_image, "image"),
    Case("decompression bomb (400 MP PNG)", _decompression_bomb, "pixel"),
    Case("class with fewer images than shot + query", _too_few_images, "images"),
    Case("unknown config key", _unknown_config_key, "unknown config key 'episdoes'"),
    Case("wrong type in config", _wrong_type, "'way' must be int"),
    Case("wrong type on the command line", _wrong_type_flag, "'episodes' must be int"),
    Case("unknown backbone", _unknown_backbone, "resnet13"),
    Case("a number out of its range (--batch-size 0)", _zero_batch_size, "'batch_size' must be >= 1"),
    Case("a negative result count (--top -3)", _negative_top, "'top' must be >= 1"),
    Case("a key given twice in a config", _duplicate_config_key, "given twice"),
    Case("unknown few-shot method", _unknown_method, "did you mean 'protonet'"),
    Case("missing checkpoint", _missing_checkpoint, "not found"),
    Case("truncated checkpoint", _truncated_checkpoint, "not a readable"),
    Case("checkpoint of another model", _mismatched_checkpoint, "does not match"),
    Case(
        "index built by another backbone",
        _index_from_other_model,
        "built with --backbone efficientnet_lite0 (this search: --backbone resnet12)",
    ),
    Case("feature store out of step with the index", _store_out_of_step, "id_map"),
    Case("empty query set", _empty_queries, "no query images"),
    Case("--out names an existing file", _out_is_a_file, "existing file"),
    Case("--out under a file", _out_under_a_file, "under a file"),
    Case("--out in a folder this user may not write", _out_not_writable, "permission denied", as_user="nobody"),
    Case("config file this user may not read", _config_not_readable, "permission denied", as_user="nobody"),
    Case("image this user may not read", _image_not_readable, "cannot read image: permission denied", as_user="nobody"),
    Case("out in the config names an existing file", _config_out_is_a_file, "names an existing file"),
    Case("a folder where an output file goes", _output_file_is_a_folder, "is a directory"),
    Case("label hierarchy with a cycle", _hierarchy_cycle, "cycle"),
    Case("label hierarchy with several roots", _hierarchy_several_roots, "roots"),
    Case(
        "class missing from the label hierarchy (unknown to it)", _hierarchy_missing_class, "missing from the hierarchy"
    ),
    Case("class that is an inner node of the hierarchy", _hierarchy_inner_class, "inner node"),
    Case("negative edge length in the hierarchy", _hierarchy_negative_length, "negative"),
    Case("EMD loss exponent rho <= 0", _emd_rho_not_positive, "emd_rho"),
    Case("EMD loss without a hierarchy", _emd_loss_without_hierarchy, "needs a label hierarchy"),
    Case("a flipped byte in a feature-store chunk (search)", _corrupt_store_chunk, "feature store corrupted"),
    Case("index over a damaged gallery without --repair", _index_over_damaged_gallery, "feature store corrupted"),
    Case("a second index run while one is writing the gallery", _gallery_locked, "another deepemd run is writing"),
    Case("a newline in an image file name", _newline_in_file_name, "control character"),
]


def cannot_run(case: Case) -> str | None:
    """Why ``case`` cannot run on this machine (its user is missing, or root without setpriv)."""
    if case.as_user is None:
        return None
    try:
        pwd.getpwnam(case.as_user)
    except KeyError:
        return f"no user '{case.as_user}' on this machine"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "running as root and setpriv (util-linux) is missing, so the CLI cannot drop root"
    return None


def _run_as_user(case: Case, tmp: Path) -> tuple[int, str, str]:
    """The CLI in a subprocess as ``case.as_user``, in a folder everyone may use (``tmp`` may lie
    under a private one), the input built under umask 022 so that only what the case locks is
    locked; paths in the output are reported under ``tmp``."""
    shared = Path(tempfile.mkdtemp(prefix="deepemd-case-"))
    umask = os.umask(0o022)
    try:
        shared.chmod(0o777)
        for private in ("home", "cache"):
            (shared / private).mkdir()
            (shared / private).chmod(0o777)
        argv, names = case.make(shared)
        command = [sys.executable, "-m", "deepemd.cli", *argv]
        if os.geteuid() == 0:
            user = pwd.getpwnam(case.as_user)
            command = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", *command]
        env = dict(os.environ, HOME=str(shared / "home"), DEEPEMD_CACHE=str(shared / "cache"))
        done = subprocess.run(command, capture_output=True, text=True, cwd=shared, env=env, timeout=300)
        return (
            done.returncode,
            done.stderr.strip().replace(str(shared), str(tmp)),
            names.replace(str(shared), str(tmp)),
        )
    finally:
        os.umask(umask)
        shutil.rmtree(shared, ignore_errors=True)


def run_case(case: Case, tmp: Path) -> tuple[int, str, str]:
    """Run one case (in-process unless ``as_user``); return (exit code, stderr, path the message
    must name)."""
    from deepemd.cli import main

    if case.as_user is not None:
        return _run_as_user(case, tmp)
    argv, names = case.make(tmp)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
    return code, err.getvalue().strip(), names


def markdown_table() -> str:
    rows = ["| bad input | exit | message |", "|---|---|---|"]
    for case in CASES:
        if cannot_run(case):
            rows.append(f"| {case.what} | not run | `{cannot_run(case)}` |")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            os.environ.setdefault("DEEPEMD_CACHE", str(Path(tmp) / "cache"))
            code, stderr, _ = run_case(case, Path(tmp))
            message = stderr[stderr.find("deepemd: error:") :]
            message = message.replace(tmp, "…").replace("\n", " ").replace("|", "\\|")
        rows.append(f"| {case.what} | {code} | `{message}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(markdown_table())
