"""``bench/foreign_tokenizer_teacher.py``: a teacher whose tokenizer shares only text with the student's. The premise
of results.md's "another tokenizer" regime: the two segment the same answers differently, a token-level pairing is
refused at load with a message that names the text-only route, and that route (a chat teacher, chunk-level OPD)
trains against such a teacher served by ``opd serve-teacher``."""

import json
from pathlib import Path

import pytest
from conftest import load_bench, tiny_model

from opdkit.config import load_config
from opdkit.data import render_completion, render_prompt
from opdkit.errors import OPDError
from opdkit.models import check_tokenizers_match, load_model, load_tokenizer
from opdkit.scenarios.arith import build_tokenizer as student_tokenizer
from opdkit.serve import create_app, serve_in_thread
from opdkit.tasks import arithmetic
from opdkit.train import setup, train

bench = load_bench("foreign_tokenizer_teacher")


def test_same_text_other_tokens():
    foreign, student = bench.build_tokenizer(), student_tokenizer()
    problems = arithmetic.make_splits({"x": 50}, seed=7)["x"]
    for p in problems:
        messages = [{"role": "user", "content": p.prompt}]
        ids = foreign(p.completion, add_special_tokens=False)["input_ids"]
        assert foreign.unk_token_id not in ids and foreign.decode(ids) == p.completion
        assert len(ids) < len(student(p.completion, add_special_tokens=False)["input_ids"])
        completion = render_completion(foreign, messages, p.completion)  # the template's prompt is a prefix
        assert completion[-1] == foreign.eos_token_id and foreign.decode(completion[:-1]) == p.completion
        assert foreign.decode(render_prompt(foreign, messages), skip_special_tokens=True) == p.prompt
    assert foreign.tokenize("2c1 4c1 2c1 7c0\n7242") == ["2", "c1 ", "4", "c1 ", "2", "c1 ", "7", "c0", "\n724", "2"]
    # a student's prefix cut inside one of the teacher's tokens still encodes, without unknown tokens
    assert foreign.tokenize("2c") == ["2", "c"] and foreign.tokenize("9c7 1") == ["9", "c7 ", "1"]


def test_token_level_pairing_is_refused_with_the_text_route():
    with pytest.raises(OPDError, match="teacher.kind: chat with objective.method: chunk_opd"):
        check_tokenizers_match(student_tokenizer(), bench.build_tokenizer())


def test_chunk_opd_trains_against_a_served_teacher_of_another_tokenizer(tiny, tiny_config, tmp_path):
    foreign = bench.build_tokenizer()
    tiny_model(foreign, 2, init=0.3).save_pretrained(tmp_path / "teacher")
    foreign.save_pretrained(tmp_path / "teacher")
    model, tokenizer = load_model(str(tmp_path / "teacher")), load_tokenizer(str(tmp_path / "teacher"))
    with serve_in_thread(create_app(model, tokenizer, "t")) as url:
        tiny_config["teacher"] = {"kind": "chat", "base_url": url, "model": "t", "chunk_length": 4,
                                  "samples_per_fork": 2, "max_forks": 2, "fork_snap": True}
        tiny_config["objective"] = {"method": "chunk_opd", "ref_kl_coef": 0.02}
        tiny_config["optim"]["steps"] = 2
        train(setup(load_config(base=tiny_config)))
    run = Path(tiny_config["output_dir"])
    steps = [json.loads(line) for line in open(run / "metrics.jsonl") if '"loss"' in line]
    assert len(steps) == 2 and all(r["teacher_forks"] > 0 and r["audited"] > 0 for r in steps)
    assert all(0 <= r["teacher_forks_moved"] <= 2 * 8 for r in steps)  # how many forks fork_snap moved, of 2 per row
    assert json.loads((run / "teacher_probe.json").read_text())["cuts"] > 0  # the prefix probe, kept with the run


def test_the_prefix_probe_tells_a_teacher_that_misreads_cuts_from_one_that_does_not(tiny, tmp_path):
    # a random teacher at temperature 0 continues its own answer exactly from any cut it reads as it wrote it: every
    # cut, on the student's tokenizer; only cuts at its own token boundaries, on a tokenizer that groups characters
    from opdkit.config import ChatTeacherSpec
    from opdkit.data import load_examples
    from opdkit.teachers.chat import ChatTeacher

    foreign = bench.build_tokenizer()
    tiny_model(foreign, 2, init=0.3).save_pretrained(tmp_path / "foreign")
    foreign.save_pretrained(tmp_path / "foreign")
    examples = load_examples(str(tiny / "train.jsonl"))
    student = load_tokenizer(str(tiny / "student"))
    found, answers = {}, {}
    for name, folder in (("same", tiny / "teacher"), ("foreign", tmp_path / "foreign")):
        with serve_in_thread(create_app(load_model(str(folder)), load_tokenizer(str(folder)), "t")) as url:
            spec = ChatTeacherSpec(kind="chat", base_url=url, model="t", chunk_length=4, prefix_probe=3)
            teacher = ChatTeacher(spec, student)
            teacher.check_prefixes(examples, max_completion_length=12)
            found[name], answers[name] = teacher.findings, teacher.answers(examples[:3], 12, temperature=0.0)
    # every token end of the three answers is a cut (one token a character, fewer than CUTS), the last ones included: cut
    # by max_completion_length, an answer's rest there is shorter than the continuation, which is no misreading
    assert any(not ended and len(text) == 12 for text, ended in answers["same"])
    assert found["same"].cuts == sum(len(text) - 1 for text, _ in answers["same"])
    assert found["same"].prompts == 3 and found["same"].consistent == 1.0
    assert found["same"].lines()[0].startswith("prefix probe: OK")
    assert found["foreign"].consistent < 0.9 and found["foreign"].examples
    assert "LOW" in found["foreign"].lines()[0] and "continuation: instruct" in found["foreign"].lines()[1]


def test_a_cut_is_read_right_when_the_continuation_reproduces_the_answer_as_far_as_both_go():
    from opdkit.teachers.prefix_probe import CUTS, cuts, reproduces

    # (rest of the answer, it ended), (continuation, it ended): a side that ended is matched to its end, a side cut by
    # its token limit only as far as it goes
    assert reproduces(" libraries", True, " libraries", True)
    assert not reproduces(" libraries", True, " libraries and their", True)  # the answer stopped, the teacher not
    assert reproduces(" libraries and their uses.", True, " libraries and", False)  # cut by chunk_length
    assert reproduces(" libraries", False, " libraries and their", False)  # the answer cut by max_completion_length
    assert reproduces(" libraries", False, " libraries and their uses.", True)
    assert not reproduces(" libraries and", False, " libraries.", True)  # stopped where the answer goes on
    assert reproduces(" libraries and their", False, " libraries", False)
    assert not reproduces(" libraries", False, " books", False) and not reproduces(" libraries", True, "", False)
    # cuts spread from an answer's first token end to its last, whatever its length
    assert cuts(12) == list(range(1, 12)) and cuts(2) == [1] and cuts(1) == []
    assert len(cuts(97)) == CUTS and cuts(97)[0] == 1 and cuts(97)[-1] == 96


def test_fork_snap_moves_forks_back_to_cuts_the_teacher_reads_right():
    from opdkit.config import ChatTeacherSpec
    from opdkit.teachers.chat import ChatTeacher
    from opdkit.teachers.prefix_probe import PrefixProbe, context

    # what the probe measured on the foreign teacher of results.md (4 prompts): right after a digit before a letter,
    # a space before a digit, a digit before a newline; wrong inside "c1 " and "\n724"
    contexts = {"digit|letter": [16, 16], "letter|digit": [0, 16], "digit|space": [0, 12], "space|digit": [12, 12],
                "digit|newline": [4, 4], "newline|digit": [0, 3], "digit|digit": [0, 3]}
    tok = student_tokenizer()
    spec = ChatTeacherSpec(kind="chat", base_url="http://127.0.0.1:1/v1", model="t", chunk_length=4, fork_snap=True)
    teacher = ChatTeacher(spec, tok)
    teacher.findings = PrefixProbe(4, 66, 32 / 66, [], contexts)
    text = "2c1 4c1 2c1 7c0\n7242"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    snapped = [teacher._snap(ids, text, t) for t in range(len(ids))]
    assert snapped == [0, 1, 1, 1, 4, 5, 5, 5, 8, 9, 9, 9, 12, 13, 13, 15, 15, 15, 15, 15]
    assert context("2c", "1 ") == "letter|digit" and not teacher.findings.reads("2c", "1 ")
    assert teacher.findings.reads("2c1 ", "4") and teacher.findings.reads("", "2") and teacher.findings.reads("2+", "x")
