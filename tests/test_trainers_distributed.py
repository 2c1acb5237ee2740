"""kd-train under torchrun: 2 CPU processes (gloo DDP), each taking every other batch, with
rank 0 alone writing metrics, checkpoints and results."""

import os
import subprocess
import sys

from trainer_runs import TINY_TINYBERT, metric_lines, summary


def test_two_process_gloo_tinybert(tmp_path, cache_dir):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "kd_trainers",
        "tinybert",
        f"--output-dir={tmp_path}",
        *TINY_TINYBERT,
        "--teacher-epochs=2",
        "--student-epochs=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # 128 augmented examples = 8 batches of 16, 4 per rank, x 2 epochs: 8 steps, logged once.
    steps = [line["step"] for line in metric_lines(tmp_path, "intermediate")]
    assert steps == list(range(1, 9))
    assert summary(tmp_path)["distill_training"]["intermediate"]["steps"] == 8
    assert 0.0 <= summary(tmp_path)["student_distilled"]["accuracy"] <= 1.0
    # Config printed once (rank 0 only).
    assert done.stderr.count("kd-train tinybert on cpu x2") == 1
