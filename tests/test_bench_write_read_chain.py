"""benchmarks/write_read_chain.py: bad arguments are refused naming the flag, and a tiny run gives a median for
every mode."""
import pytest

from neuralmem_fast.ops.dnc import has_write_read_kernel
from tests.helpers import assert_refuses_argument, load_script


@pytest.fixture(scope="module")
def chain():
    return load_script("benchmarks/write_read_chain.py", "write_read_chain_under_test")


@pytest.mark.parametrize("argv,flag", [(["--rounds", "5"], "--rounds"), (["--n", "0"], "--n"),
                                       (["--b", "0"], "--b"), (["--processes", "3"], "--processes")])
def test_bad_arguments_name_the_flag(chain, capsys, argv, flag):
    assert_refuses_argument(chain.main, argv, flag, capsys)


@pytest.mark.skipif(not has_write_read_kernel(), reason="the native write_read op is not built")
def test_tiny_run_times_every_mode(chain):
    res = chain.measure(N=16, B=2, rounds=6, D=8, R=2, T=3)
    assert set(res) == set(chain.MODES)
    assert all(v > 0 for v in res.values())
