"""Typed configs: dataclasses filled from defaults, a YAML file, ``--key value`` and ``--set``.

Every method has one flat dataclass that extends :class:`TrainConfig`. Precedence, lowest
first: the dataclass defaults, ``--config cfg.yaml`` (a mapping of keys), ``--key value``
options, ``--set key=value`` overrides. Values are parsed by the field's annotation
(``int``, ``float``, ``bool``, ``str``, ``str | None``, ``list[str]``); an unknown key or a
value of the wrong type is a :class:`ConfigError` with a one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from kd_trainers.errors import ConfigError

LOSS_BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")


@dataclasses.dataclass
class TrainConfig:
    """What every method shares: where to write, how to seed, and how the loop runs.

    Each stage of a method takes its epochs and learning rate from the method's own keys
    (``teacher_epochs``, ``distill_lr``, ...); everything below applies to all stages.
    """

    output_dir: str = "runs/{method}"
    seed: int = 0
    device: str = "auto"
    loss_backend: str = "auto"
    batch_size: int = 32
    eval_batch_size: int = 128
    group_by_length: bool = False
    grad_accum: int = 1
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_steps: int = 0
    max_length: int = 64
    bf16: bool = True
    log_every: int = 10
    save_every: int = 0
    progress: bool = True
    threads: int = 0
    resume: bool = False
    data_cache: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    score_column: str | None = "score"
    eval_fraction: float = 0.1
    max_train: int = 0
    max_eval: int = 0

    def validate(self) -> None:
        """Raises ConfigError for values no stage could run with."""
        if self.loss_backend not in LOSS_BACKENDS:
            raise ConfigError(f"loss_backend must be one of {', '.join(LOSS_BACKENDS)}")
        for name in ("batch_size", "eval_batch_size", "grad_accum", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclasses.dataclass
class DistillConfig(TrainConfig):
    """Keys of every teacher -> student method: the models, the teacher's fine-tuning, the
    student baseline trained alone, and the distillation temperature."""

    teacher: str = "minilm"
    student: str = "teacher"
    student_keep_every: int = 2
    tokenizer: str = "minilm"
    pooling: str = "mean"
    teacher_epochs: float = 2.0
    teacher_lr: float = 5e-5
    student_epochs: float = 3.0
    student_lr: float = 1e-4
    temperature: float = 1.0
    baseline: bool = True
    teacher_head: str = "finetune"
    # Chosen on mpnet / vader:movie (1600 train, 400 held-out train): 0.877 there, 0.81 at 1e-3.
    linear_head_l2: float = 0.3
    teacher_cache: str | None = "auto"
    teacher_cache_mb: float = 1024.0

    def validate(self) -> None:
        super().validate()
        if self.teacher_head not in ("finetune", "linear"):
            raise ConfigError(f"teacher_head must be finetune or linear, got {self.teacher_head!r}")
        if self.linear_head_l2 < 0:
            raise ConfigError(f"linear_head_l2 must be >= 0, got {self.linear_head_l2}")
        if self.teacher_cache_mb < 0:
            raise ConfigError(f"teacher_cache_mb must be >= 0, got {self.teacher_cache_mb}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.student_keep_every < 1:
            raise ConfigError(f"student_keep_every must be >= 1, got {self.student_keep_every}")


HELP: dict[str, str] = {
    "output_dir": "run folder: config, metrics.jsonl, summary.json, checkpoints, models",
    "seed": "seed of data order, splits, dropout and initialization",
    "device": "auto (cuda when available), cpu, cuda or cuda:N",
    "loss_backend": "kd_kernels backend of every loss the method uses (torch = reference)",
    "batch_size": "examples per micro-batch per process",
    "eval_batch_size": "examples per evaluation batch",
    "grad_accum": "micro-batches per optimizer step",
    "max_steps": "stop every stage after this many optimizer steps (0: run its epochs)",
    "max_length": "tokens per sequence (pairs share it)",
    "group_by_length": "batches of texts of similar length (less padding; the order of "
    "batches and the groups stay seeded and random)",
    "bf16": "bf16 autocast on CUDA (ignored on CPU)",
    "log_every": "optimizer steps between metric lines",
    "save_every": "optimizer steps between checkpoints (0: at stage end and on Ctrl-C only)",
    "progress": "show a tqdm progress bar",
    "threads": "torch CPU threads (0: torch's default)",
    "resume": "continue the run in output_dir from its last checkpoint",
    "data_cache": "folder of fetched dataset archives (default $KD_TRAINERS_CACHE or ~/.cache)",
    "text_column": "column of the text in your own data files",
    "text_pair_column": "column of the second text of a pair (none: single texts)",
    "label_column": "column of class labels (strings or ints) in your own data",
    "score_column": "column of regression scores in your own data",
    "eval_fraction": "share of a dataset held out for evaluation (fixed, seeded split)",
    "max_train": "cap on training examples per dataset (0: all)",
    "max_eval": "cap on evaluation examples per dataset (0: all)",
    "teacher": "minilm (the packaged all-MiniLM-L6-v2), mpnet (all-mpnet-base-v2, after "
    "'kd-train data fetch mpnet'), a local HF directory or tiny[:LxH]",
    "student": "teacher (the teacher's layers kept every student_keep_every) or a model name",
    "student_keep_every": "k: the student keeps teacher layers k-1, 2k-1, ...",
    "tokenizer": "tokenizer of tiny random models (minilm or a directory)",
    "pooling": "sentence vector for the heads: mean (of tokens) or cls",
    "teacher_epochs": "epochs of the teacher's fine-tuning",
    "student_epochs": "epochs of the student trained on labels alone (the baseline)",
    "temperature": "softmax temperature of the distillation loss",
    "baseline": "also train the student alone, for comparison",
    "teacher_head": "finetune (train the teacher on the task) or linear (frozen teacher encoder, "
    "head fitted in closed form / LBFGS on its pooled outputs)",
    "linear_head_l2": "L2 weight of the linear teacher head (on standardized features)",
    "teacher_cache": "folder of teacher outputs kept on disk, keyed by teacher weights, "
    "tokenizer, max_length and data (auto: <data cache>/teacher_outputs; none: off)",
    "teacher_cache_mb": "largest cache file; layer outputs over it are recomputed each step",
}


def field_type(cls: type, field: dataclasses.Field) -> Any:
    """The resolved annotation of a dataclass field (annotations are strings here)."""
    return typing.get_type_hints(cls)[field.name]


def parse_value(kind: Any, text: Any, key: str) -> Any:
    """Parses ``text`` (a YAML value or a command-line string) as the annotation ``kind``."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if text is None or (isinstance(text, str) and text.lower() in ("none", "null", "")):
            return None
        return parse_value(options[0], text, key)
    if origin is list:
        (item,) = typing.get_args(kind)
        items = text if isinstance(text, list) else [t for t in str(text).split(",") if t]
        return [parse_value(item, value, key) for value in items]
    if kind is bool:
        if isinstance(text, bool):
            return text
        lowered = str(text).lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} expects true or false, got {text!r}")
    if kind in (int, float):
        if isinstance(text, bool):
            raise ConfigError(f"{key} expects {kind.__name__}, got {text!r}")
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} expects {kind.__name__}, got {text!r}") from None
        if kind is int and isinstance(text, float) and not text.is_integer():
            raise ConfigError(f"{key} expects int, got {text!r}")
        return value
    if kind is str:
        if isinstance(text, (list, dict)):
            raise ConfigError(f"{key} expects a string, got {text!r}")
        return str(text)
    raise ConfigError(f"{key}: unsupported config type {kind}")


def unknown_key(cls: type, key: str, method: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} for {method}{hint}")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--key`` option per field, shown with its default in ``--help``."""
    parser.add_argument("--config", type=Path, help="YAML file of key: value pairs")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key (repeatable); applied last",
    )
    for field in dataclasses.fields(cls):
        kind = field_type(cls, field)
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        # A method's own HELP entry says more than the shared one.
        text = getattr(cls, "HELP", {}).get(field.name) or HELP.get(field.name, "")
        extra = {"metavar": field.name.upper()}
        if field.name == "loss_backend":
            extra = {"choices": LOSS_BACKENDS}
        if kind is bool:
            parser.add_argument(
                flag,
                dest=field.name,
                nargs="?",
                const="true",
                default=argparse.SUPPRESS,
                metavar="BOOL",
                help=f"{text} (default: {default})",
            )
        else:
            parser.add_argument(
                flag,
                dest=field.name,
                default=argparse.SUPPRESS,
                help=f"{text} (default: {default})",
                **extra,
            )


def build_config(cls: type, args: argparse.Namespace, method: str) -> Any:
    """The config of ``method`` from parsed arguments (see the module docstring for order)."""
    values: dict[str, Any] = {}
    field_names = {f.name for f in dataclasses.fields(cls)}
    if args.config is not None:
        if not args.config.is_file():
            raise ConfigError(f"config file {args.config} does not exist")
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {args.config} must hold a mapping of keys")
        values.update(loaded)
    values.update({k: v for k, v in vars(args).items() if k in field_names})
    for override in args.overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {override!r}")
        values[key.strip().replace("-", "_")] = value
    hints = typing.get_type_hints(cls)
    parsed = {}
    for key, value in values.items():
        if key not in field_names:
            raise unknown_key(cls, key, method)
        parsed[key] = parse_value(hints[key], value, key)
    config = cls(**parsed)
    config.output_dir = config.output_dir.replace("{method}", method)
    config.validate()
    return config


def config_to_yaml(config: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
