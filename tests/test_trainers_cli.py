"""kd-train's command line and configs: help, typed parsing and precedence, and one-line
errors for bad configs (before any training starts)."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_runs import TINY_TINYBERT, run

from kd_trainers.cli import METHODS, build_parser, main
from kd_trainers.config import build_config, parse_value
from kd_trainers.errors import ConfigError
from kd_trainers.mtdnn_kd import MTDNNKDConfig
from kd_trainers.tinybert import TinyBERTConfig


def config_of(cls, *argv):
    args = build_parser().parse_args(["tinybert" if cls is TinyBERTConfig else "mtdnn-kd", *argv])
    return build_config(cls, args, "method")


def test_help_lists_methods(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in (*METHODS, "data"):
        assert name in out


def test_method_help_shows_options_with_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["tinybert", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--attention-threshold" in out and "(default: -100.0)" in out
    assert "--loss-backend {auto,torch,cpu,triton,cuda}" in out
    assert "(default: rotten_tomatoes)" in out


@pytest.mark.parametrize("entry", ["module", "script"])
def test_entry_points_run(entry):
    """``python -m kd_trainers`` and the ``kd-train`` console script (next to the venv's python)."""
    script = Path(sys.executable).with_name("kd-train")
    command = [sys.executable, "-m", "kd_trainers"] if entry == "module" else [str(script)]
    done = subprocess.run([*command, "mtdnn-kd", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--teacher-dropouts" in done.stdout


@pytest.mark.parametrize(
    ("kind", "text", "expected"),
    [
        (int, "12", 12),
        (float, "1e-3", 1e-3),
        (bool, "false", False),
        (bool, True, True),
        (str | None, "none", None),
        (str | None, "x", "x"),
        (list[str], "a,b", ["a", "b"]),
        (list[float], [0.1, "0.2"], [0.1, 0.2]),
    ],
)
def test_parse_value(kind, text, expected):
    assert parse_value(kind, text, "key") == expected


@pytest.mark.parametrize(
    ("kind", "text"), [(int, "abc"), (int, 1.5), (bool, "maybe"), (float, True)]
)
def test_parse_value_rejects(kind, text):
    with pytest.raises(ConfigError, match="key expects"):
        parse_value(kind, text, "key")


def test_precedence_defaults_yaml_options_set(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("batch_size: 8\nseed: 3\ntemperature: 2.0\nteacher_dropouts: [0.3]\n")
    config = config_of(MTDNNKDConfig, f"--config={path}", "--seed=5", "--set", "seed=7")
    assert (config.batch_size, config.seed, config.temperature) == (8, 7, 2.0)
    assert config.teacher_dropouts == [0.3]
    assert config.output_dir == "runs/method"
    assert dataclasses.asdict(config)["hard_weight"] == 1.0


def run_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("kd-train: error: ")
    return err[-1]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (
            ["--set", "batchsize=3"],
            "unknown config key 'batchsize' for tinybert (did you mean 'batch_size'?)",
        ),
        (["--batch-size=abc"], "batch_size expects int"),
        (["--batch-size=0"], "batch_size must be >= 1"),
        (["--temperature=0"], "temperature must be > 0"),
        (["--set", "seed"], "--set expects KEY=VALUE"),
        (["--config=/nonexistent.yaml"], "config file /nonexistent.yaml does not exist"),
        (["--mode=general"], "mode=general needs general_data"),
        (["--teacher=tiny:4x63"], "tiny width must be a multiple of 4"),
        (["--teacher=/no/such/model"], "is neither 'minilm', 'mpnet', 'tiny[:LxH]' nor a local"),
    ],
)
def test_bad_config_one_line_error(capsys, tmp_path, argv, fragment):
    message = run_error(capsys, "tinybert", f"--output-dir={tmp_path}", *TINY_TINYBERT, *argv)
    assert fragment in message


def test_unknown_dataset(capsys, tmp_path):
    message = run_error(
        capsys, "tinybert", f"--output-dir={tmp_path}", *TINY_TINYBERT, "--task=nosuch"
    )
    assert "nosuch" in message and "rotten_tomatoes" in message


def test_dataset_not_fetched_says_how(capsys, tmp_path):
    empty = tmp_path / "empty_cache"
    empty.mkdir()
    message = run_error(
        capsys, "mtdnn-kd", f"--output-dir={tmp_path}", f"--data-cache={empty}", "--teacher=tiny"
    )
    assert "kd-train data fetch rotten_tomatoes" in message


def test_missing_column(capsys, tmp_path, cache_dir):
    data = tmp_path / "reviews.csv"
    data.write_text("sentence,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(20)))
    message = run_error(
        capsys, "tinybert", f"--output-dir={tmp_path}", *TINY_TINYBERT, f"--task={data}"
    )
    assert "'text'" in message and "sentence" in message


def test_user_csv_with_named_column_trains(tmp_path, cache_dir):
    data = tmp_path / "reviews.csv"
    rows = [f"a fine film {i},pos\n" if i % 2 else f"a dull film {i},neg\n" for i in range(40)]
    data.write_text("sentence,verdict\n" + "".join(rows))
    args = [*TINY_TINYBERT, f"--task={data}", "--text-column=sentence", "--label-column=verdict"]
    assert run("tinybert", tmp_path / "run", *args, "--max-steps=1") == 0


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--student=tiny:3x64"], "layer_mapping 'uniform'"),
        (
            ["--student=tiny:2x128", "--hidden-projection=false"],
            "student width 128 != teacher width 64",
        ),
        (["--layer-mapping=1,x"], "layer_mapping: uniform, top, bottom or ints"),
    ],
)
def test_bad_student_fails_before_training(capsys, tmp_path, cache_dir, argv, fragment):
    message = run_error(capsys, "tinybert", f"--output-dir={tmp_path}", *TINY_TINYBERT, *argv)
    assert fragment in message
    assert not (tmp_path / "stages").exists()


def test_wider_student_with_projection_trains(tmp_path, cache_dir):
    args = [*TINY_TINYBERT, "--student=tiny:2x128", "--baseline=false", "--max-steps=2"]
    assert run("tinybert", tmp_path, *args) == 0
    weights = __import__("trainer_runs").final_weights(tmp_path, "intermediate")
    assert weights["projection.weight"].shape == (64, 128)


def test_mtdnn_bad_tasks(capsys, tmp_path):
    message = run_error(
        capsys,
        "mtdnn-kd",
        f"--output-dir={tmp_path}",
        "--teacher-tasks=bbc",
        "--tasks=rotten_tomatoes",
    )
    assert "teacher_tasks names tasks not in tasks: ['bbc']" in message


def test_data_list(capsys, cache_dir):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "rotten_tomatoes" in out and "vader:movie" in out
