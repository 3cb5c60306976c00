"""benchmarks/memory_core_length.py: bad arguments are refused naming the flag, the marginal costs are the
differences of the times over those of the lengths, and a tiny run times every length."""
import pytest

from tests.helpers import assert_refuses_argument, load_script


@pytest.fixture(scope="module")
def length():
    return load_script("benchmarks/memory_core_length.py", "memory_core_length_under_test")


@pytest.mark.parametrize("argv,flag", [(["--lengths", "4"], "--lengths"), (["--lengths", "4,4"], "--lengths"),
                                       (["--lengths", "0,3"], "--lengths"), (["--lengths", "2,x"], "--lengths"),
                                       (["--rounds", "1"], "--rounds"), (["--n", "0"], "--n"),
                                       (["--threads", "0"], "--threads"), (["--block", "0"], "--block")])
def test_bad_arguments_name_the_flag(length, capsys, argv, flag):
    assert_refuses_argument(length.main, argv, flag, capsys)


def test_marginals_are_differences_over_lengths(length):
    got = length.marginals({6: 3.0, 2: 1.0, 11: 4.0})
    assert got == [(2, 6, 0.5), (6, 11, 0.2)]


def test_tiny_run_times_every_length(length):
    times = length.measure([1, 2], N=16, rounds=2, block=2)
    assert sorted(times) == [1, 2]
    assert all(v > 0 for v in times.values())
