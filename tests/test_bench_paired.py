"""benchmarks/memory_core_paired.py's arguments: bad ones are refused, naming the flag, before anything runs."""
import pytest

from tests.helpers import assert_refuses_argument, load_script


@pytest.fixture(scope="module")
def paired():
    return load_script("benchmarks/memory_core_paired.py", "memory_core_paired_under_test", on_path=True)


@pytest.mark.parametrize("argv,flag", [(["--threads", "-1"], "--threads"), (["--warm", "-1"], "--warm"),
                                       (["--n", "128,1024", "--rounds", "3,4,5"], "--rounds"),
                                       (["--optimizer", "sgd"], "--optimizer")])
def test_bad_arguments_name_the_flag(paired, capsys, argv, flag):
    import torch

    threads = torch.get_num_threads()
    assert_refuses_argument(paired.main, argv, flag, capsys)
    assert torch.get_num_threads() == threads  # nothing was set before the refusal
