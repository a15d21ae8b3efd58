"""The shared options: one declaration per option, checked when parsed (before any work)."""

from __future__ import annotations

import contextlib
import io
import time

import pytest

from deepemd.cli import build_parser, main
from deepemd.config import build_config, read_yaml
from deepemd.errors import DeepEMDError
from deepemd.fewshot.config import EvalConfig as FewShotEval
from deepemd.fewshot.config import PretrainConfig
from deepemd.options import DataOptions, LocalOptions, ModelOptions
from deepemd.registry import Registry
from deepemd.retrieval.config import EvalConfig, IndexConfig, SearchConfig, TrainConfig

SHARED = (DataOptions, ModelOptions, LocalOptions)


def _run(argv: list[str]) -> tuple[int, str, float]:
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, err.getvalue(), time.perf_counter() - start


@pytest.mark.parametrize(
    "argv,phrase",
    [
        (["retrieval", "eval", "--data-root", "demo", "--batch-size", "0"], "'batch_size' must be >= 1"),
        (["retrieval", "eval", "--data-root", "demo", "--per-class", "-1"], "'per_class' must be >= 1"),
        (["retrieval", "search", "--top", "0"], "'top' must be >= 1"),
        (["retrieval", "search", "--top", "-3"], "'top' must be >= 1"),
        (["retrieval", "eval", "--data-root", "demo", "--alpha", "1.5"], "'alpha' must be <= 1"),
        (["fewshot", "test", "--data-root", "demo", "--query", "0"], "'query' must be >= 1"),
        (["fewshot", "test", "--data-root", "demo", "--episodes", "0"], "'episodes' must be >= 1"),
        (["fewshot", "test", "--data-root", "demo", "--temperature", "0"], "'temperature' must be > 0"),
        (["fewshot", "test", "--data-root", "demo", "--backbone", "resnet13"], "did you mean 'resnet18'"),
        (["retrieval", "eval", "--data-root", "demo", "--solver", "exakt"], "did you mean 'exact'"),
        (["retrieval", "eval", "--data-root", "demo", "--methods", "fcn", "gird"], "did you mean 'grid'"),
        (["fewshot", "test", "--data-root", "demo", "--methods", "protonett"], "did you mean 'protonet'"),
        (["fewshot", "test", "--data-root", "demo", "--layout", "mini-imagenet"], "did you mean 'miniimagenet'"),
    ],
)
def test_bad_values_fail_when_parsed(argv, phrase, tmp_path):
    code, err, seconds = _run([*argv, "--out", str(tmp_path / "out")])
    assert code == 2 and phrase in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work: nothing written


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("way: 5\nshot: 1\nway: 10\n")
    with pytest.raises(DeepEMDError, match="key 'way' is given twice"):
        read_yaml(path)


def test_renamed_option_names_its_new_name():
    with pytest.raises(DeepEMDError, match="renamed: write 'grid_ratio'"):
        build_config(EvalConfig, {"grid_enlarge": 2.0})
    with pytest.raises(DeepEMDError, match="renamed: write 'weights'"):
        build_config(FewShotEval, {"pretrained": True})


def test_both_jobs_share_one_declaration_of_each_shared_option():
    import dataclasses

    shared = {f.name: f for cls in SHARED for f in dataclasses.fields(cls)}
    for job in (EvalConfig, IndexConfig, SearchConfig, TrainConfig, FewShotEval, PretrainConfig):
        for f in dataclasses.fields(job):
            if f.name in shared:  # a job may retune a default, never the help or the rules
                assert f.metadata == shared[f.name].metadata, (job.__name__, f.name)
            assert f.metadata.get("help"), f"{job.__name__}.{f.name} has no help"
    assert {"center", "grid_ratio", "data_root"} <= {f.name for f in dataclasses.fields(EvalConfig)}
    assert {"center", "grid_ratio", "data_root"} <= {f.name for f in dataclasses.fields(FewShotEval)}


def test_help_lists_the_registries_choices():
    from deepemd.backbones import BACKBONES
    from deepemd.emd.api import SOLVERS
    from deepemd.fewshot.methods import METHODS
    from deepemd.local import KINDS

    def help_of(*path: str) -> str:
        parser = build_parser()
        for name in path:
            parser = next(
                a for a in parser._actions if hasattr(a, "choices") and a.choices and name in a.choices
            ).choices[name]
        return " ".join(parser.format_help().split())

    retrieval, fewshot = help_of("retrieval", "eval"), help_of("fewshot", "test")
    for names in (BACKBONES.names(), KINDS.names(), SOLVERS.names()):
        assert f"[choices: {', '.join(names)}]" in retrieval and f"[choices: {', '.join(names)}]" in fewshot
    assert f"[choices: {', '.join(METHODS)}]" in fewshot


def test_demo_data_root_works_in_both_jobs():
    from deepemd.build import read_images
    from deepemd.data import demo_root

    cfg = build_config(EvalConfig, {"data_root": "demo", "max_classes": 2, "per_class": 3})
    images = read_images(cfg, cfg.split, cfg.seed)
    assert len(images) == 6 and all(demo_root() in p.parents for p in images.paths)
    few = build_config(FewShotEval, {"data_root": "demo", "max_classes": 2, "per_class": 3})
    assert len(read_images(few, few.split, few.seed)) == 6


def test_registry_names_errors_and_duplicates():
    reg: Registry[int] = Registry("widget", normalise=str.lower)
    reg.add("alpha", 1, summary="a")
    assert reg.get("ALPHA") == 1 and reg.info("alpha") == {"summary": "a"} and "Alpha" in reg
    with pytest.raises(DeepEMDError, match="(?s)unknown widget 'alpah'.*did you mean 'alpha'"):
        reg.get("alpah")
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("alpha", 2)
