"""teacher_head=linear (a head fitted on a frozen encoder) and the disk cache of teacher
outputs (read back instead of running the teacher; invalidated by a changed teacher, tokenizer
or data; a corrupt file recomputed), plus one tiny cross-architecture TinyBERT run (an MPNet
teacher directory, a BERT student with another vocabulary) run twice over one cache."""

import random

import pytest
import torch
from test_trainers_mpnet import mpnet_style_tokenizer, tiny_mpnet
from trainer_runs import TINY_MTDNN, run, summary

from kd_trainers import tinybert
from kd_trainers.data import Example
from kd_trainers.evaluation import predict
from kd_trainers.linear_head import fit_linear_head, fit_logistic, fit_ridge, pooled_features
from kd_trainers.models import Head, build_model, encode, load_tokenizer
from kd_trainers.teacher_cache import (
    LayerTargets,
    TeacherCache,
    cache_key,
    compute_layers,
    weights_fingerprint,
)

WORDS = [
    "good",
    "bad",
    "film",
    "plot",
    "actor",
    "slow",
    "fun",
    "dull",
    "great",
    "awful",
    "story",
    "music",
    "scene",
    "long",
]


def texts(count: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [Example(" ".join(rng.choices(WORDS, k=rng.randint(2, 9)))) for _ in range(count)]


# ------------------------------------------------------------------------------ linear head


def test_logistic_head_separates_separable_classes():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=generator) * 4
    labels = torch.arange(300) % 3
    x = centers[labels] + torch.randn(300, 16, generator=generator)
    weight, bias = fit_logistic(x, labels, 3, l2=1e-3)
    assert weight.shape == (3, 16) and bias.shape == (3,) and weight.dtype == torch.float64
    assert ((x.double() @ weight.T + bias).argmax(-1) == labels).all()
    test_labels = torch.arange(300) % 3
    fresh = centers[test_labels] + torch.randn(300, 16, generator=generator)
    accuracy = ((fresh.double() @ weight.T + bias).argmax(-1) == test_labels).double().mean()
    assert accuracy >= 0.99


def test_ridge_without_penalty_is_least_squares():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(200, 12, generator=generator) * torch.linspace(0.1, 10, 12)
    y = x @ torch.randn(12, generator=generator) + 3.0 + 0.1 * torch.randn(200, generator=generator)
    weight, bias = fit_ridge(x, y, l2=0.0)
    design = torch.cat([x.double(), torch.ones(200, 1, dtype=torch.float64)], 1)
    reference = torch.linalg.lstsq(design, y.double()[:, None]).solution[:, 0]
    torch.testing.assert_close(weight[0], reference[:12], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(bias[0], reference[12], rtol=1e-8, atol=1e-10)
    shrunk, _ = fit_ridge(x, y, l2=10.0)
    assert shrunk.norm() < 0.5 * weight.norm()  # the penalty does shrink


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_linear_teacher_head_fits_and_leaves_the_encoder(kind):
    tokenizer = load_tokenizer("tiny", "minilm")
    head = Head("task", 2) if kind == "classification" else Head("task", 1, "regression")
    model = build_model(
        "tiny:2x32", [head], vocab_size=len(tokenizer), pooling="mean", scores=False, seed=0
    )
    examples = texts(160, 0)
    features = pooled_features(
        model, tokenizer, examples, max_length=16, batch_size=32, device="cpu"
    )
    direction = torch.randn(32, generator=torch.Generator().manual_seed(2))
    projection = features @ direction
    if kind == "classification":  # a linear rule of the encoder's own features: separable
        labels = (projection > projection.median()).long().tolist()
        examples = [Example(e.text, label=y) for e, y in zip(examples, labels, strict=True)]
    else:
        examples = [
            Example(e.text, score=float(v) + 0.5) for e, v in zip(examples, projection, strict=True)
        ]
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    fit = fit_linear_head(
        model, head, tokenizer, examples, l2=1e-6, max_length=16, batch_size=32, device="cpu"
    )
    assert all(torch.equal(v, before[k]) for k, v in model.encoder.state_dict().items())
    assert all(p.grad is None for p in model.encoder.parameters())
    outputs = predict(model, tokenizer, examples, head, max_length=16, batch_size=32, device="cpu")
    if kind == "classification":
        accuracy = (outputs.argmax(-1) == torch.tensor(labels)).double().mean()
        assert fit["train_accuracy"] >= 0.97 and accuracy == fit["train_accuracy"]
    else:
        gold = projection + 0.5
        assert (outputs - gold).norm() / gold.norm() < 1e-3  # an exact linear target
        assert fit["train_mse"] < 1e-6 * gold.var()


# ------------------------------------------------------------------------------ cache


@pytest.fixture
def teacher():
    tokenizer = load_tokenizer("tiny", "minilm")
    model = build_model(
        "tiny:2x32",
        [Head("task", 3)],
        vocab_size=len(tokenizer),
        pooling="mean",
        scores=True,
        seed=0,
    ).eval()
    return model, tokenizer


class Counter:
    def __init__(self, model):
        self.calls = 0
        model.encoder.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def logits_of(model, tokenizer, examples, cache, max_length=16):
    key = cache_key(model, tokenizer, max_length, examples, {"logits": "task"})

    def compute():
        out = predict(
            model,
            tokenizer,
            examples,
            Head("task", 3),
            max_length=max_length,
            batch_size=8,
            device="cpu",
        )
        return {"logits": out}

    return cache.get(key, compute)["logits"], key


def test_second_read_skips_the_teacher(teacher, tmp_path):
    model, tokenizer = teacher
    counter, lines = Counter(model), []
    cache = TeacherCache(tmp_path, log=lines.append)
    examples = texts(20, 1)
    first, key = logits_of(model, tokenizer, examples, cache)
    assert counter.calls == 3 and first.shape == (20, 3)  # 20 examples in batches of 8
    again, same_key = logits_of(model, tokenizer, examples, cache)
    assert counter.calls == 3 and same_key == key
    assert torch.equal(again, first)
    assert any("read from" in line for line in lines)
    # A fresh process would see the same key: the fingerprint hashes weights, not identity.
    clone = build_model(
        "tiny:2x32",
        [Head("task", 3)],
        vocab_size=len(tokenizer),
        pooling="mean",
        scores=True,
        seed=0,
    )
    clone.load_state_dict(model.state_dict())
    assert weights_fingerprint(clone) == weights_fingerprint(model)


def test_changed_teacher_tokenizer_or_data_recompute(teacher, tmp_path):
    model, tokenizer = teacher
    counter = Counter(model)
    cache = TeacherCache(tmp_path, log=lambda _: None)
    examples = texts(8, 2)
    first, key = logits_of(model, tokenizer, examples, cache)
    assert counter.calls == 1
    changed = [*examples[:-1], Example(examples[-1].text + " film")]
    _, data_key = logits_of(model, tokenizer, changed, cache)
    _, length_key = logits_of(model, tokenizer, examples, cache, max_length=8)
    assert counter.calls == 3 and len({key, data_key, length_key}) == 3
    with torch.no_grad():
        model.heads["task"].bias[0] += 1.0  # only the head changes
    shifted, head_key = logits_of(model, tokenizer, examples, cache)
    assert counter.calls == 4 and head_key != key
    torch.testing.assert_close(shifted[:, 0], first[:, 0] + 1.0)
    other = mpnet_style_tokenizer()
    assert cache_key(model, other, 16, examples, {}) != cache_key(
        model, tokenizer, 16, examples, {}
    )


def test_corrupt_cache_file_is_recomputed(teacher, tmp_path):
    model, tokenizer = teacher
    counter, lines = Counter(model), []
    cache = TeacherCache(tmp_path, log=lines.append)
    examples = texts(8, 3)
    first, key = logits_of(model, tokenizer, examples, cache)
    path = cache.path(key)
    path.write_bytes(path.read_bytes()[:100])  # a truncated write
    again, _ = logits_of(model, tokenizer, examples, cache)
    assert counter.calls == 2 and torch.equal(again, first)
    assert any("unreadable" in line and str(path) in line for line in lines)
    assert cache.read(key) is not None  # rewritten whole
    other = TeacherCache(tmp_path, log=lines.append)
    path.rename(other.path("0" * 32))  # a file under another key's name is not trusted
    assert other.read("0" * 32) is None and "key does not match" in lines[-1]


def test_over_budget_is_not_written(teacher, tmp_path):
    cache = TeacherCache(tmp_path, budget_mb=1e-4, log=lambda _: None)
    assert not cache.write("k", {"x": torch.zeros(1000)})
    assert not cache.path("k").exists()


def test_packed_layers_match_the_batched_teacher(teacher, tmp_path):
    model, tokenizer = teacher
    examples = texts(11, 4)

    def forward(batch):
        inputs = encode(tokenizer, batch, 16, "cpu")
        return inputs, model(inputs, output_layers=True)[1]

    with torch.no_grad():
        tensors = compute_layers(forward, examples, [0, 2], [1], batch_size=4)
    targets = LayerTargets(tensors, [0, 2, 2], [1, 1])
    picked = [7, 0, 3]
    inputs, outputs = forward([examples[i] for i in picked])
    hidden, scores = targets.batch(picked, inputs["attention_mask"])
    assert len(hidden) == 3 and len(scores) == 2
    mask = inputs["attention_mask"].bool()
    for got, layer in zip(hidden, [0, 2, 2], strict=True):
        expected = outputs.hidden_states[layer].detach()
        torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5)
        assert (got[~mask] == 0).all()
    pairs = mask[:, None, :, None] & mask[:, None, None, :]
    expected = outputs.attentions[1].detach()
    torch.testing.assert_close(
        scores[0][pairs.expand_as(expected)], expected[pairs.expand_as(expected)]
    )
    assert (scores[0][~pairs.expand_as(expected)] < -1e30).all()
    with pytest.raises(ValueError, match="token lengths"):
        targets.batch(picked, torch.ones(3, mask.shape[1] + 1, dtype=torch.long))


# ------------------------------------------------------------------------------ end to end


def test_mpnet_teacher_linear_head_cached_tinybert(tmp_path, cache_dir, monkeypatch, capsys):
    """A tiny MPNet teacher (MPNet vocabulary) into a tiny BERT student (MiniLM vocabulary):
    the second run reads stage 1's layers and stage 2's logits from the cache."""
    teacher_dir = tmp_path / "mpnet_teacher"
    mpnet = tiny_mpnet(vocab_size=30527, hidden_size=64, num_hidden_layers=4, num_attention_heads=4)
    mpnet.save_pretrained(str(teacher_dir))
    mpnet_style_tokenizer().save_pretrained(str(teacher_dir))
    args = [
        f"--teacher={teacher_dir}",
        "--student=tiny:2x64",
        "--teacher-head=linear",
        f"--teacher-cache={tmp_path / 'teacher_cache'}",
        "--baseline=false",
        "--max-train=32",
        "--max-eval=16",
        "--batch-size=16",
        "--max-length=24",
        "--intermediate-epochs=1",
        "--prediction-epochs=1",
        "--augment-copies=1",
        "--progress=false",
        "--threads=1",
    ]
    calls = {"layers": 0, "logits": 0}

    def counting(name, function):
        def wrapped(*a, **k):
            calls[name] += 1
            return function(*a, **k)

        return wrapped

    monkeypatch.setattr(tinybert, "compute_layers", counting("layers", tinybert.compute_layers))
    monkeypatch.setattr(tinybert, "predict", counting("logits", tinybert.predict))
    assert run("tinybert", tmp_path / "first", *args) == 0
    assert calls == {"layers": 1, "logits": 1}
    first = summary(tmp_path / "first")
    assert first["teacher_training"]["head"] == "linear"
    assert first["augmented_examples"] == 64
    capsys.readouterr()
    layer_calls = []
    original = type(mpnet).forward

    def spy(self, *a, **k):
        layer_calls.append(bool(k.get("output_attentions")))
        return original(self, *a, **k)

    monkeypatch.setattr(type(mpnet), "forward", spy)
    assert run("tinybert", tmp_path / "second", *args) == 0
    assert calls == {"layers": 1, "logits": 1}  # nothing recomputed
    assert layer_calls and not any(layer_calls)  # the teacher ran for its head and eval only
    assert capsys.readouterr().err.count("teacher outputs read from") == 2
    second = summary(tmp_path / "second")
    assert second["teacher"] == first["teacher"]
    assert second["student_distilled"] == first["student_distilled"]


def test_mtdnn_linear_teachers_cached_targets(tmp_path, cache_dir, capsys):
    """Linear-head teachers: no teacher stage trains; a second run reads every teacher's pooled
    vectors (one file per teacher, task and split) from the cache and gets the same results."""
    args = [
        *TINY_MTDNN,
        "--teacher-head=linear",
        f"--teacher-cache={tmp_path / 'teacher_cache'}",
        "--baseline=false",
        "--student-epochs=1",
    ]
    assert run("mtdnn-kd", tmp_path / "first", *args) == 0
    assert not (tmp_path / "first" / "stages" / "teacher_0").exists()
    files = sorted((tmp_path / "teacher_cache").glob("*.pt"))
    # tiny teachers have seeded random encoders: 2 teachers x 3 tasks x (train, eval)
    assert len(files) == 12
    capsys.readouterr()
    assert run("mtdnn-kd", tmp_path / "second", *args) == 0
    assert sorted((tmp_path / "teacher_cache").glob("*.pt")) == files
    assert capsys.readouterr().err.count("teacher outputs read from") == 12
    first, second = summary(tmp_path / "first"), summary(tmp_path / "second")
    for name in ("teacher_0", "teacher_1", "ensemble", "student_kd"):
        assert first[name] == second[name]
    assert first["teacher_0"]["rotten_tomatoes"]["accuracy"] > 0


def test_mtdnn_mixed_ensemble_each_teacher_its_encoder_and_tokenizer(
    tmp_path, cache_dir, monkeypatch
):
    """teachers=tiny BERT,MPNet directory,MPNet directory with heads finetune,linear: each
    teacher reads the text with its own tokenizer, the two MPNet teachers share one set of
    pooled vectors (one encoder pass per task and split), and a linear teacher's outputs are
    its head on those vectors, i.e. what the model itself predicts."""
    from kd_trainers import mtdnn_kd

    teacher_dir = tmp_path / "mpnet_teacher"
    mpnet = tiny_mpnet(vocab_size=30527, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    mpnet.save_pretrained(str(teacher_dir))
    mpnet_style_tokenizer().save_pretrained(str(teacher_dir))
    passes = []
    original = mtdnn_kd.pooled_features

    def spy(model, tokenizer, examples, **kw):
        passes.append((type(model.encoder).__name__, len(tokenizer), len(examples)))
        return original(model, tokenizer, examples, **kw)

    monkeypatch.setattr(mtdnn_kd, "pooled_features", spy)
    targets = {}
    soft_targets = mtdnn_kd.soft_targets

    def keep(method, teachers):
        targets["method"], targets["teachers"] = method, teachers
        return soft_targets(method, teachers)

    monkeypatch.setattr(mtdnn_kd, "soft_targets", keep)
    args = [
        *TINY_MTDNN,
        "--num-teachers=3",
        f"--teachers=tiny:2x64,{teacher_dir}",
        "--teacher-heads=finetune,linear",
        "--teacher-cache=none",
        "--teacher-epochs=1",
        "--student-epochs=1",
        "--baseline=false",
    ]
    assert run("mtdnn-kd", tmp_path / "run", *args) == 0
    result = summary(tmp_path / "run")
    assert result["teachers"] == [
        {"encoder": "tiny:2x64", "head": "finetune"},
        {"encoder": str(teacher_dir), "head": "linear"},
        {"encoder": "tiny:2x64", "head": "finetune"},
    ]
    # Only the MPNet teacher is linear: 3 tasks x (train, eval), with the MPNet tokenizer.
    assert sorted(set(passes)) == sorted({("MPNetModel", 30527, 32), ("MPNetModel", 30527, 24)})
    assert len(passes) == 6
    method, teachers = targets["method"], targets["teachers"]
    task = method.tasks[0]
    predicted = predict(
        teachers[1],
        method.tokenizers[str(teacher_dir)],
        task.train.examples,
        task.head,
        max_length=32,
        batch_size=16,
        device=torch.device("cpu"),
    )
    cached = method.teacher_outputs(1, teachers[1], task, "train")
    assert (cached - predicted).norm() / predicted.norm() < 1e-5
    # teacher_0 and teacher_2 share an encoder name but not their random tiny weights.
    assert not torch.equal(
        teachers[0].encoder.embeddings.word_embeddings.weight,
        teachers[2].encoder.embeddings.word_embeddings.weight,
    )


def test_mtdnn_bad_teacher_lists(tmp_path, cache_dir, capsys):
    from kd_trainers.errors import ConfigError
    from kd_trainers.mtdnn_kd import MTDNNKDConfig

    assert run("mtdnn-kd", tmp_path / "run", *TINY_MTDNN, "--teacher-heads=linear,frozen") != 0
    assert "teacher_heads must list finetune or linear per teacher" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="teachers is empty"):
        MTDNNKDConfig(teachers=[]).validate()
    with pytest.raises(ConfigError, match="teacher_heads must list"):
        MTDNNKDConfig(teacher_heads=[]).validate()
