"""benchmarks/memory_core_paired.py's arguments: bad ones are refused, naming the flag, before anything runs."""
import importlib.util
import os
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "memory_core_paired.py")


@pytest.fixture(scope="module")
def paired():
    bench = os.path.dirname(os.path.abspath(SCRIPT))
    sys.path.insert(0, bench)
    try:
        spec = importlib.util.spec_from_file_location("memory_core_paired_under_test", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(bench)
    return mod


@pytest.mark.parametrize("argv,flag", [(["--threads", "-1"], "--threads"), (["--warm", "-1"], "--warm"),
                                       (["--n", "128,1024", "--rounds", "3,4,5"], "--rounds"),
                                       (["--optimizer", "sgd"], "--optimizer")])
def test_bad_arguments_name_the_flag(paired, capsys, argv, flag):
    import torch

    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as e:
        paired.main(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err
    assert torch.get_num_threads() == threads  # nothing was set before the refusal
