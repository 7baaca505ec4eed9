"""The scale benchmark's concurrency: Flower's client resources for N clients at once."""

import os

from simulations.benchmarks.scale import client_resources, is_scale_folder


def test_concurrency_shares_the_cpus_among_the_workers_and_asks_for_no_gpu_on_the_cpu():
    cores = os.cpu_count() or 1
    assert client_resources(40, 1, "cpu") == {"num-supernodes": 40, "client-resources-num-cpus": cores}
    assert client_resources(40, 2 * cores, "cpu")["client-resources-num-cpus"] == 1  # never zero


def test_a_sweep_folder_is_recognised_as_the_benchmarks_own(tmp_path):
    assert not is_scale_folder(tmp_path)
    (tmp_path / "concurrency-2" / "users").mkdir(parents=True)
    assert is_scale_folder(tmp_path)
