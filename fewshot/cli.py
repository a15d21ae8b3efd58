"""``deepemd fewshot pretrain | train | test``: each option from its dataclass, YAML via ``--config``.

Precedence: dataclass defaults < ``--config`` YAML < explicit flags (``deepemd.config``).
Heavy imports (torch models, solvers) happen inside the command functions so that
``deepemd --help`` stays fast.
"""

from __future__ import annotations

import argparse

from deepemd.config import add_command, checked_outputs, config_from_args
from deepemd.fewshot.config import EvalConfig, PretrainConfig, TrainConfig


def _pretrain(cfg: PretrainConfig) -> int:
    from deepemd.fewshot.pretrain import pretrain

    pretrain(cfg)
    return 0


def _train(cfg: TrainConfig) -> int:
    from deepemd.fewshot.metatrain import meta_train

    meta_train(cfg)
    return 0


def _list_methods() -> int:
    from deepemd.fewshot.methods import METHODS

    for key, spec in METHODS.items():
        print(f"{key:12s} {'(k-shot only) ' if spec.kshot_only else ''}{spec.summary}")
    return 0


def _test(cfg: EvalConfig) -> int:
    from deepemd.eval.tables import to_markdown
    from deepemd.fewshot.evaluate import run_test

    frame = run_test(cfg)
    print(to_markdown(frame[["method", "way", "shot", "accuracy", "ci95"]]))
    print(f"wrote {cfg.out}/results.csv, results.md, episodes.csv" + (", flows.png" if cfg.flow_picture else ""))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    fewshot = subparsers.add_parser("fewshot", help="few-shot classification: pretrain, train, test")
    sub = fewshot.add_subparsers(dest="fewshot_command", required=True, metavar="{pretrain,train,test}")
    commands = (
        (
            "pretrain",
            PretrainConfig,
            _pretrain,
            "pre-train the backbone with a linear classifier over the train classes (+ rotation loss)",
        ),
        ("train", TrainConfig, _train, "episodic meta-training through the differentiable EMD layer"),
        ("test", EvalConfig, _test, "seeded test episodes: every method on the same episodes, mean and 95% CI"),
    )
    for name, cls, run, help_ in commands:
        parser = add_command(sub, name, cls, run, help_)
        if name == "test":
            parser.add_argument("--list-methods", action="store_true", help="list the methods and exit")
            parser.set_defaults(
                func=lambda args: (
                    _list_methods() if args.list_methods else _test(checked_outputs(config_from_args(EvalConfig, args)))
                )
            )
