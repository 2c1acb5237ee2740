"""``kd-train`` / ``python -m kd_trainers``: one subcommand per method, plus ``data``."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Sequence

from kd_trainers.config import add_config_arguments, build_config
from kd_trainers.errors import ConfigError
from kd_trainers.trainer import request_stop

# method name -> module; each module has CONFIG (a TrainConfig dataclass), DESCRIPTION and
# run(config, runtime) -> (summary dict, Markdown result table).
METHODS = {
    "tinybert": "kd_trainers.tinybert",
    "mtdnn-kd": "kd_trainers.mtdnn_kd",
    "aad": "kd_trainers.aad",
    "scal": "kd_trainers.scal",
    "simcse": "kd_trainers.simcse",
    "trans-encoder": "kd_trainers.trans_encoder",
    "promptbert": "kd_trainers.promptbert",
}


def method_module(name: str):
    return importlib.import_module(METHODS[name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd-train",
        description="Reference distillation trainers on kd_kernels' fused losses.",
        epilog="Multi-process: torchrun --nproc_per_node N -m kd_trainers METHOD ...",
    )
    commands = parser.add_subparsers(dest="command", metavar="METHOD", required=True)
    for name in METHODS:
        module = method_module(name)
        sub = commands.add_parser(
            name,
            help=module.DESCRIPTION,
            description=module.DESCRIPTION,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        add_config_arguments(sub, module.CONFIG)
    data = commands.add_parser(
        "data", help="list or fetch the built-in offline datasets and models (mpnet)"
    )
    data.add_argument("action", choices=["list", "fetch"])
    data.add_argument("names", nargs="*", help="names for fetch ('all': every dataset)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            from kd_trainers.data import data_command

            return data_command([args.action, *args.names])
        return run_method(args.command, args)
    except ConfigError as error:
        print(f"kd-train: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def catch_stop_signals() -> dict:
    """SIGINT and SIGTERM both stop a run as Ctrl-C does: a checkpoint, then exit code 130
    (see :class:`kd_trainers.trainer.StopRequest`).
    (A shell starts background jobs with SIGINT ignored; a scheduler stops jobs with SIGTERM.)
    Returns the previous handlers, for :func:`restore_signals`."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {number: signal.signal(number, request_stop) for number in STOP_SIGNALS}


def restore_signals(previous: dict) -> None:
    for number, handler in previous.items():
        signal.signal(number, handler)


def run_method(name: str, args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from kd_trainers.trainer import setup_runtime, teardown_runtime

    module = method_module(name)
    config = build_config(module.CONFIG, args, name)
    # Our own progress bar and log lines; HF's load reports and shard bars are noise here.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    previous_handlers = catch_stop_signals()
    runtime = setup_runtime(config, name)
    finished = False
    try:
        summary, table = module.run(config, runtime)
        runtime.write_json("summary.json", {"method": name, **summary})
        runtime.log(f"\n{table}\nresults: {runtime.output_dir / 'summary.json'}")
        finished = True
    finally:
        teardown_runtime(runtime, wait=finished)
        restore_signals(previous_handlers)
    return 0


def cli() -> None:
    """Console-script entry point (``kd-train``)."""
    sys.exit(main())
