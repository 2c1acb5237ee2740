"""Runs ``kd-train`` in-process on tiny random models and a small slice of real data, and
reads back what a run writes (summary.json, metrics.jsonl, final stage weights)."""

import json
from pathlib import Path

import torch

from kd_trainers.cli import main

# Tiny and fast: a 4-layer x 64 teacher, 2-layer x 64 student (4 heads each), 64 training
# examples, batches of 16, one epoch per stage.
TINY_TINYBERT = [
    "--teacher=tiny:4x64",
    "--student=tiny:2x64",
    "--max-train=64",
    "--max-eval=32",
    "--batch-size=16",
    "--max-length=32",
    "--teacher-epochs=1",
    "--student-epochs=1",
    "--intermediate-epochs=2",
    "--prediction-epochs=2",
    "--intermediate-lr=1e-3",
    "--prediction-lr=1e-3",
    "--augment-copies=1",
    "--log-every=1",
    "--progress=false",
    "--threads=1",
]
TINY_MTDNN = [
    "--teacher=tiny:2x64",
    "--tasks=rotten_tomatoes,vader:movie=score,bbc",
    "--max-train=32",
    "--max-eval=24",
    "--batch-size=16",
    "--max-length=32",
    "--teacher-epochs=3",
    "--teacher-lr=1e-3",
    "--student-epochs=3",
    "--student-lr=1e-3",
    "--log-every=1",
    "--progress=false",
    "--threads=1",
]


def run(method: str, output: Path, *args: str) -> int:
    return main([method, f"--output-dir={output}", *args])


def summary(output: Path) -> dict:
    return json.loads((output / "summary.json").read_text())


def metric_lines(output: Path, stage: str | None = None) -> list[dict]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if stage is None or line["stage"] == stage]


def losses(output: Path, stage: str, key: str = "loss") -> list[float]:
    return [line[key] for line in metric_lines(output, stage)]


def task_losses(output: Path, stage: str, task: str) -> list[float]:
    """The losses of one task's batches (MT-DNN logs ``loss[TASK]`` on its task's steps)."""
    key = f"loss[{task}]"
    return [line[key] for line in metric_lines(output, stage) if key in line]


def final_weights(output: Path, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(output / "stages" / stage / "final.pt", weights_only=False)["model"]


TINY_AAD = [
    "--model=tiny:2x64",
    "--source=vader:movie",
    "--target=vader:amazon",
    "--max-train=64",
    "--max-eval=32",
    "--batch-size=16",
    "--max-length=32",
    "--source-epochs=2",
    "--source-lr=1e-3",
    "--adapt-epochs=2",
    "--adapt-lr=1e-4",
    "--log-every=1",
    "--progress=false",
    "--threads=1",
]
TINY_SCAL = [
    "--model=tiny:2x64",
    "--max-train=64",
    "--max-eval=32",
    "--batch-size=16",
    "--max-length=32",
    "--epochs=2",
    "--lr=1e-3",
    "--epsilon=0.05",
    "--attack-epsilon=0.05",
    "--attack-steps=3",
    "--log-every=1",
    "--progress=false",
    "--threads=1",
]
# Sentence embeddings: 64 wiki sentences, batches of 16, evaluated on 200 Lee pairs (64 tokens).
TINY_SENTENCE = [
    "--model=tiny:2x64",
    "--max-train=64",
    "--batch-size=16",
    "--max-length=32",
    "--eval-data=lee",
    "--max-eval=200",
    "--eval-max-length=64",
    "--log-every=1",
    "--progress=false",
    "--threads=1",
]
TINY_SIMCSE = [*TINY_SENTENCE, "--epochs=2", "--lr=1e-3"]
TINY_TRANS_ENCODER = [
    *TINY_SENTENCE,
    "--max-pairs=64",
    "--cross-batch-size=16",
    "--cross-max-length=64",
    "--cycles=1",
    "--simcse-epochs=2",
    "--simcse-lr=1e-3",
    "--cross-epochs=2",
    "--cross-lr=1e-3",
    "--bi-epochs=3",
    "--bi-lr=1e-3",
]
TINY_PROMPTBERT = [*TINY_SENTENCE, "--epochs=6", "--lr=3e-3"]


def epoch_means(output: Path, stage: str, steps_per_epoch: int, key: str = "loss") -> list[float]:
    """Mean logged value per epoch (one metric line per step): contrastive losses are noisy
    from batch to batch, an epoch's mean is not."""
    values = losses(output, stage, key)
    return [
        sum(values[i : i + steps_per_epoch]) / steps_per_epoch
        for i in range(0, len(values), steps_per_epoch)
    ]


def save_tiny_bert(directory: Path, hidden: int, dropout: float = 0.1) -> Path:
    """A 2-layer random BERT of width ``hidden`` (4 heads, seed 0) with MiniLM's tokenizer,
    saved as a local model folder (``--model DIR``, sentence-transformers' Transformer)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from kd_trainers.models import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(config, add_pooling_layer=False).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory
