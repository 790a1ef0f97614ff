"""Malformed configs, datasets and model folders either work or fail with OPDError, never a raw traceback.

Hypothesis mutates a valid tiny config (wrong types, out-of-range and non-finite numbers, unknown keys,
missing sections, broken model folders, bad server URLs) and writes random JSONL datasets. Whatever
passes ``load_config`` and ``setup`` must also survive one training step. ``OPD_FUZZ_EXAMPLES`` sets how
many inputs each test tries (default 40; derandomized, so a run is reproducible); ``-s`` prints the outcomes.
"""

import collections
import copy
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opdkit.config import load_config
from opdkit.errors import OPDError
from opdkit.train import setup, train_step, trainable_parameters, lr_lambda

FUZZ = settings(max_examples=int(os.environ.get("OPD_FUZZ_EXAMPLES", 40)), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

LEAVES = [
    "seed", "threads", "precision", "output_dir", "student.path", "teacher.path", "teacher.kind", "data.train",
    "data.eval", "data.task", "data.eval_size", "rollout.temperature", "rollout.top_p",
    "rollout.max_completion_length", "rollout.batch_size", "objective.method", "objective.beta",
    "objective.lmbda", "objective.temperature", "objective.top_k", "objective.support", "objective.divergence",
    "objective.grad_path", "objective.estimator", "objective.ref_kl_coef", "objective.aggregation",
    "optim.steps", "optim.learning_rate", "optim.weight_decay", "optim.adam_betas", "optim.warmup_steps",
    "optim.min_lr_ratio", "optim.gradient_accumulation_steps", "optim.max_grad_norm", "optim.max_nonfinite_steps",
    "eval.every", "eval.batch_size", "eval.max_completion_length", "checkpoint.every", "checkpoint.keep",
    "checkpoint.best_metric",
]
NUMBERS = st.one_of(st.integers(-3, 40), st.sampled_from([0.0, -1.0, 1e-12, 0.5, 1.0, 2.0, 1e30, math.nan, math.inf, -math.inf]))
WORDS = st.sampled_from(["", "opd", "gkd", "seqkd", "tropd", "full", "sampled", "teacher_topk", "direct", "pg", "k3",
                         "server", "chat", "local", "bf16", "fp32", "auto", "arithmetic", "nope", "builtin:nope/x",
                         "hf:nope:train", "reverse_kl", "accuracy", "token_mean", "\x00", "ü" * 3])
VALUES = st.one_of(st.none(), st.booleans(), NUMBERS, WORDS, st.text(max_size=8),
                   st.lists(NUMBERS, max_size=3), st.dictionaries(st.text(max_size=4), NUMBERS, max_size=2))


@pytest.fixture(scope="module")
def bad_models(tiny, tmp_path_factory) -> list[str]:
    """Model folders a user might point at by mistake."""
    root = tmp_path_factory.mktemp("bad_models")
    folders = {name: root / name for name in ("empty", "bad_json", "no_weights", "truncated", "no_tokenizer")}
    folders["empty"].mkdir()
    folders["bad_json"].mkdir()
    (folders["bad_json"] / "config.json").write_text("{not json")
    folders["no_weights"].mkdir()
    shutil.copy(tiny / "student" / "config.json", folders["no_weights"])
    shutil.copytree(tiny / "student", folders["truncated"])
    weights = folders["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    folders["no_tokenizer"].mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny / "student" / name, folders["no_tokenizer"])
    return [str(p) for p in folders.values()] + [str(tiny / "train.jsonl")]  # the last: a file, not a folder


def base_config(tiny, output_dir: str) -> dict:
    return {
        "seed": 0, "output_dir": output_dir, "threads": 1,
        "student": {"path": str(tiny / "student")}, "teacher": {"path": str(tiny / "teacher")},
        "data": {"train": str(tiny / "train.jsonl"), "eval": str(tiny / "heldout.jsonl"), "task": "arithmetic",
                 "eval_size": 4},
        "rollout": {"max_completion_length": 6, "batch_size": 2},
        "optim": {"steps": 1},
        "eval": {"batch_size": 4},
    }


def set_leaf(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        if not isinstance(tree.get(key), dict):
            tree[key] = {}
        tree = tree[key]
    tree[leaf] = value


def one_step(tree: dict, kind: str) -> None:
    """``load_config`` -> ``setup`` -> one training step; OPDError anywhere is a clean refusal."""
    import random

    import torch

    try:
        run = setup(load_config(base=tree))
    except OPDError:
        OUTCOMES[kind]["refused with OPDError"] += 1
        return
    optimizer = torch.optim.AdamW(trainable_parameters(run), lr=run.config.optim.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(run.config))
    try:
        train_step(run, optimizer, scheduler, random.Random(0))
    except OPDError:
        OUTCOMES[kind]["refused at the first step with OPDError"] += 1
        return
    OUTCOMES[kind]["worked"] += 1


@st.composite
def mutated_configs(draw, tiny, bad_models: list[str], output_dir: str) -> dict:
    tree = base_config(tiny, output_dir)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["leaf", "leaf", "model", "server", "unknown key", "drop", "not a section"]))
        if action == "leaf":
            set_leaf(tree, draw(st.sampled_from(LEAVES)), draw(VALUES))
        elif action == "model":
            set_leaf(tree, draw(st.sampled_from(["student.path", "teacher.path"])), draw(st.sampled_from(bad_models)))
        elif action == "server":
            tree["teacher"] = {"kind": draw(st.sampled_from(["server", "chat"])), "model": draw(WORDS),
                               "base_url": draw(st.sampled_from(["", "not a url", "ftp://127.0.0.1/v1", "http://[::1",
                                                                 "http://127.0.0.1:9/v1", []])),
                               "max_retries": 0, "timeout_s": 2}
        elif action == "unknown key":
            section = draw(st.sampled_from([None, "rollout", "optim", "objective", "data"]))
            set_leaf(tree, f"{section}.{draw(st.text(min_size=1, max_size=8))}" if section else draw(st.text(min_size=1, max_size=8)),
                     draw(VALUES))
        elif action == "drop":
            tree.pop(draw(st.sampled_from(sorted(tree))), None)
        else:
            tree[draw(st.sampled_from(["rollout", "optim", "objective", "data", "student"]))] = draw(VALUES)
    return tree


def test_malformed_configs_work_or_fail_with_opderror(tiny, bad_models):
    output_dir = tempfile.mkdtemp()

    @FUZZ
    @given(mutated_configs(tiny, bad_models, output_dir))
    def check(tree):
        one_step(copy.deepcopy(tree), "configs")

    check()
    print(f"\nconfigs: {dict(OUTCOMES['configs'])}")


MESSAGES = st.lists(st.fixed_dictionaries({}, optional={
    "role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool", ""]), VALUES),
    "content": st.one_of(st.text(max_size=12), VALUES)}), max_size=3)
RECORDS = st.one_of(
    st.fixed_dictionaries({}, optional={
        "prompt": st.one_of(st.text(max_size=40), st.sampled_from(["12+34", "7" * 80]), VALUES),
        "messages": st.one_of(MESSAGES, VALUES),
        "completion": st.one_of(st.text(max_size=12), st.just("46"), VALUES),
        "answer": st.one_of(st.text(max_size=4), VALUES)}),
    VALUES,
)
PLAUSIBLE = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=30)},
                          optional={"completion": st.text(max_size=10), "answer": st.text(max_size=4)}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=15)}), min_size=1, max_size=3)}),
)
LINES = st.one_of(st.just('{"prompt": "12+34", "completion": "46", "answer": "46"}'),
                  PLAUSIBLE.map(lambda r: json.dumps(r, ensure_ascii=False)),
                  RECORDS.map(lambda r: json.dumps(r, ensure_ascii=False)), st.text(max_size=20), st.just(""))


@given(lines=st.lists(LINES, max_size=6), method=st.sampled_from(["opd", "gkd", "seqkd"]),
       as_eval=st.booleans())
@FUZZ
def test_malformed_datasets_work_or_fail_with_opderror(tiny, lines, method, as_eval):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tree = base_config(tiny, str(Path(folder) / "run"))
        tree["data"]["eval" if as_eval else "train"] = str(path)
        tree["objective"] = {"method": method}
        one_step(tree, "datasets")


def teardown_module():
    print(f"\nfuzz outcomes: {json.dumps({k: dict(v) for k, v in OUTCOMES.items()})}")


OVERRIDES = st.lists(st.one_of(st.text(max_size=12), st.builds(lambda k, v: f"{k}={v}", st.sampled_from(LEAVES + ["a.b.c", "", "."]),
                                                               st.text(max_size=8))), max_size=3)


@FUZZ
@given(content=st.one_of(st.text(max_size=60).map(str.encode), st.binary(max_size=40),
                         st.sampled_from([b"- a\n- b", b"a: [", b"student: 3", b"{{}}", b"!!python/object:os.system x"])),
       overrides=OVERRIDES)
def test_malformed_yaml_files_and_overrides_fail_with_opderror(tmp_path_factory, content, overrides):
    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_bytes(content)
    try:
        load_config(path, overrides)
        OUTCOMES["yaml and --set"]["valid"] += 1
    except OPDError:
        OUTCOMES["yaml and --set"]["refused with OPDError"] += 1


def test_inputs_that_fuzzing_found_are_refused_with_the_fix(tiny, bad_models, tmp_path):
    """Each of these once escaped as a raw traceback."""
    cases = [({"objective": {"method": None}}, "unknown method None"),
             ({"teacher": {"kind": "server", "model": "m", "base_url": "http://[::1"}}, "write it as http://HOST:PORT/v1"),
             ({"teacher": {"kind": "server", "model": "m", "base_url": "ftp://h/v1"}}, "not an http(s) URL")]
    cases += [({"student": {"path": path}}, "save") for path in bad_models]
    for change, message in cases:
        tree = {**base_config(tiny, str(tmp_path / "run")), **change}
        with pytest.raises(OPDError, match=re.escape(message)):
            setup(load_config(base=tree))
    with pytest.raises(OPDError, match="is not a YAML value"):
        load_config(base=base_config(tiny, str(tmp_path)), overrides=["seed=\x1f"])
    (tmp_path / "latin1.yaml").write_bytes(b"seed: \xe9")
    with pytest.raises(OPDError, match="not valid YAML"):
        load_config(tmp_path / "latin1.yaml")
