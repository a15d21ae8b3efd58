"""Stage timings recorded from inside the job code, the whole-job ETA, and the long-run warning."""

from __future__ import annotations

import time

from deepemd.timing import JobClock, format_seconds, record, recording, stage


def test_stages_are_recorded_only_inside_a_recording():
    with stage("outside"):
        pass
    with recording() as timer:
        with stage("a"):
            time.sleep(0.01)
        with stage("a"):
            pass
        record("b", 2.5)
        with recording() as inner:
            with stage("c"):
                pass
    assert set(timer.seconds) == {"a", "b"} and timer.calls["a"] == 2
    assert timer.get("a") >= 0.01 and timer.get("b") == 2.5 and set(inner.seconds) == {"c"}


def test_job_clock_replaces_each_guess_by_the_measured_rate():
    clock = JobClock()
    clock.plan("features", 100, 1.0)
    clock.plan("rerank", 50, 0.1)
    assert clock.remaining() == 100 + 5
    clock.advance("features", 10, 2.0)  # measured: 0.2 s per image
    assert abs(clock.remaining() - (90 * 0.2 + 5)) < 1e-9
    assert "job ETA 23s" in clock.describe()
    assert format_seconds(75) == "1m15s" and format_seconds(4000) == "1h06m"


def test_long_run_warning_names_the_cheaper_options():
    from deepemd.retrieval.config import EvalConfig
    from deepemd.retrieval.evaluate import long_run_warning

    cfg = EvalConfig(data_root="x", image_size=224)
    clock = JobClock()
    clock.plan("features", 2000, 0.5)
    clock.plan("rerank: +DeepEMD-FCN", 2000, 0.01)
    text = long_run_warning(clock, cfg, 2000)
    assert "about 17m" in text and "--methods fcn" in text and "--image-size (now 224 px" in text
    assert "--per-class" in text
    quick = JobClock()
    quick.plan("features", 10, 0.5)
    assert long_run_warning(quick, cfg, 10) is None


def test_planning_the_run_leaves_its_random_patches_alone():
    import torch

    from deepemd.retrieval.build import local_specs, make_embedder
    from deepemd.retrieval.config import EvalConfig
    from deepemd.retrieval.evaluate import parse_method, plan_job

    cfg = EvalConfig(data_root="x", image_size=32, patch_size=32, methods=("sampling",), rerank_k=5, num_patches=3)
    model = make_embedder(cfg, local_specs(cfg, ["sampling"]))
    before = model.extractors["sampling"].generator.get_state()
    clock = plan_job(model, cfg, 10, [parse_method("sampling", "cross")], torch.device("cpu"))
    assert torch.equal(model.extractors["sampling"].generator.get_state(), before)
    assert set(clock.plans) == {"features", "rerank: +DeepEMD-Sampling"} and clock.remaining() > 0


def test_the_plan_does_not_count_the_first_solve(monkeypatch):
    """On a fresh install the first solve compiles the kernel (seconds); the ETA must not scale
    that by the number of images (the demo once warned of a 2-hour run that took 23 s)."""
    import time

    import torch

    from deepemd.retrieval import evaluate
    from deepemd.retrieval.build import local_specs, make_embedder
    from deepemd.retrieval.config import EvalConfig

    real = evaluate.Reranker.rerank
    calls = []

    def first_call_slow(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)  # what a compile costs
        return real(self, *args, **kwargs)

    monkeypatch.setattr(evaluate.Reranker, "rerank", first_call_slow)
    cfg = EvalConfig(data_root="x", image_size=32, methods=("fcn",), rerank_k=5)
    model = make_embedder(cfg, local_specs(cfg, ["fcn"]))
    clock = evaluate.plan_job(model, cfg, 1000, [evaluate.parse_method("fcn", "cross")], torch.device("cpu"))
    assert clock.plans["rerank: +DeepEMD-FCN"].remaining() < 1000 * 0.5  # not 1,000 x the 1 s compile
