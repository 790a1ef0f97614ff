from opdkit.tasks import arithmetic, get_verifier


def test_scratchpad_works_columns_units_first():
    assert arithmetic.scratchpad(1857, 5385, 4) == "2c1 4c1 2c1 7c0\n7242"
    assert arithmetic.scratchpad(9999, 9999, 4) == "8c1 9c1 9c1 9c1\n19998"


def test_checker_reads_only_the_last_line():
    check = get_verifier("arithmetic")
    assert check("2c1 4c1 2c1 7c0\n7242", "7242")
    assert check("anything at all\n 7242 \n", "7242")
    assert not check("2c1 4c1 2c1 7c0\n7243", "7242")
    assert not check("", "7242")


def test_splits_are_disjoint_seeded_and_correct():
    a = arithmetic.make_splits({"train": 300, "heldout": 100}, seed=5)
    b = arithmetic.make_splits({"train": 300, "heldout": 100}, seed=5)
    assert a == b
    train = {(p.a, p.b) for p in a["train"]}
    assert len(train) == 300 and not train & {(p.a, p.b) for p in a["heldout"]}
    for p in a["heldout"]:
        assert arithmetic.is_correct(p.completion, p.answer) and int(p.answer) == p.a + p.b
