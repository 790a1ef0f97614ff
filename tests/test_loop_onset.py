"""``bench/loop_onset.py``: how the tokens of a greedy answer are classed around a loop."""

from conftest import load_bench

bench = load_bench("loop_onset")


def test_tokens_are_free_until_a_loop_is_entered_then_inside_from_its_third_occurrence():
    # 1 2 3 4 then "5 6 7 8" three times: the run 5 6 7 8 occurs a second time at index 11, a third at 15
    ids = [1, 2, 3, 4] + [5, 6, 7, 8] * 3
    kinds = bench.classes(ids)
    assert kinds[:11] == ["free"] * 11
    assert kinds[11] == "entry"  # the second 5 6 7 8 ends here
    assert kinds[12:15] == [None] * 3  # after the entry, runs seen twice: neither free nor inside
    assert kinds[15] == "inside"  # the third occurrence
    # an answer that repeats a run twice but never loops has no entry: every token stays free
    assert bench.classes([1, 2, 3, 4, 9, 1, 2, 3, 4]) == ["free"] * 9
