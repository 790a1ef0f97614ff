"""The branching-addition task (``tasks.branching``): the fork, both formats, the checker and the splits."""

from opdkit.tasks import arithmetic, branching, get_verifier


def test_the_first_token_decides_the_format():
    assert branching.completion(857, 385, 3, "+") == "+2c1 4c1 2c1\n1242"
    assert branching.completion(857, 385, 3, "=") == "=1242"
    assert branching.branch("+2c1 4c1 2c1\n1242") == "scratchpad"
    assert branching.branch("=1242") == "direct"
    assert branching.branch("1242") is None and branching.branch("") is None


def test_fork_tokens_are_in_the_arithmetic_alphabet():
    # the scenario reuses arith's tokenizer: one token per character of arithmetic.CHARACTERS
    assert set(branching.BRANCHES) <= set(arithmetic.CHARACTERS)


def test_checker_scores_both_branches_exactly():
    check = get_verifier("branching")
    assert check("+2c1 4c1 2c1\n1242", "1242")
    assert check("=1242", "1242")
    assert check("=1242\n", "1242")
    assert not check("=1243", "1242")
    assert not check("+2c1 4c1 2c1\n1243", "1242")
    assert not check("+2c1 4c1 2c1", "1242")  # no answer line
    assert not check("", "1242")


def test_splits_hold_both_branches_of_every_training_problem():
    a = branching.make_splits({"train": 200, "heldout": 300}, digits=3, seed=4)
    assert a == branching.make_splits({"train": 200, "heldout": 300}, digits=3, seed=4)
    train = a["train"]
    assert len(train) == 400
    for first, second in zip(train[::2], train[1::2]):
        assert (first.a, first.b) == (second.a, second.b) and {first.fork, second.fork} == {"+", "="}
    assert not {(p.a, p.b) for p in train} & {(p.a, p.b) for p in a["heldout"]}
    direct = sum(p.fork == "=" for p in a["heldout"])
    assert 100 < direct < 200  # a fair coin per held-out problem
    for p in train + a["heldout"]:
        assert 100 <= p.a <= 999 and branching.is_correct(p.completion, p.answer)
        assert p.record()["branch"] == branching.branch(p.completion)


def test_fork_report_forces_each_branch_of_a_tiny_model():
    # the scenario's measurement on an untrained model (no build): shares are probabilities, a forced fork is taken
    from opdkit.scenarios import arith, branch
    from opdkit.tasks.branching import BRANCHES

    tokenizer = arith.build_tokenizer()
    model = arith.new_model(tokenizer, dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=32), seed=0)
    examples = arith.as_examples(branching.make_splits({"heldout": 6}, digits=3, seed=1))["heldout"]
    report = branch.fork_report(model, tokenizer, examples, batch_size=4)
    assert 0 <= report["p_direct"] <= 1 and 0 <= report["greedy_direct"] <= 1
    assert set(report) >= {"accuracy"} | {f"forced_{name}" for name in BRANCHES.values()}
    assert all(tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id for token in BRANCHES)


def test_the_shipped_pair_unpacks_in_its_recorded_regime(tmp_path, monkeypatch):
    # the pair of docs/results.md's GAE-OPD section, the same bits on every processor; greedy decoding of the same
    # weights can flip a near-tie on another processor, hence the small tolerances
    import json

    from opdkit.data import load_examples
    from opdkit.models import load_model, load_tokenizer
    from opdkit.scenarios import branch, resolve_builtin

    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path))
    folder = resolve_builtin("builtin:branch/student").parent
    assert folder == tmp_path / branch.FOLDER
    for name in ("teacher", "student"):
        assert (folder / name / "model.safetensors").read_bytes() == (branch.SHIPPED / name / "model.safetensors").read_bytes()
    recorded = json.loads((folder / "build.json").read_text())["validation"]
    validation = load_examples("builtin:branch/validation")
    tokenizer = load_tokenizer(str(folder / "student"))
    for name in ("teacher", "student"):
        measured = branch.fork_report(load_model(str(folder / name)), tokenizer, validation)
        for key in ("p_direct", "forced_scratchpad", "forced_direct"):
            assert abs(measured[key] - recorded[name][key]) <= 0.02, (name, key, measured, recorded[name])
