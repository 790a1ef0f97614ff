"""Teacher signals scored once (``opd score-teacher``) and read back (``data.teacher_signals``): equal to live
scoring bit for bit for a local teacher, and refused when the manifest does not match the run."""

from __future__ import annotations

import json
import random

import pytest
import torch

from opdkit.config import load_config
from opdkit.data import load_examples
from opdkit.errors import OPDError
from opdkit.models import load_model, load_tokenizer
from opdkit.rollout import from_dataset
from opdkit.score_teacher import score_teacher
from opdkit.teachers import LocalTeacher
from opdkit.teachers.stored import SignalStore, StoredTeacher

GKD_TOPK = {"method": "gkd", "support": "teacher_topk", "top_k": 5, "lmbda": 0.5}


@pytest.fixture
def scored(tiny_config, tmp_path):
    """A gkd config on teacher top-k (half dataset, half student states) and its store."""
    config = {**tiny_config, "objective": GKD_TOPK}
    manifest = score_teacher(load_config(base=config), tmp_path / "signals")
    return config, manifest


def live_teacher(tiny):
    tokenizer = load_tokenizer(str(tiny / "student"))
    return LocalTeacher(load_model(str(tiny / "teacher")), tokenizer), tokenizer


def test_stored_signals_equal_live_scoring_bit_for_bit(tiny, scored):
    config, manifest = scored
    assert manifest["k"] == 20 and manifest["entropy"] and manifest["examples"] == 64  # diagnostics.top_k 20
    store = SignalStore.open(manifest["folder"])
    teacher, tokenizer = live_teacher(tiny)
    examples = load_examples(config["data"]["train"])
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)  # other batches than the scoring's, so other padding
    for start in range(0, len(order), 8):
        rollouts = from_dataset(tokenizer, [examples[i] for i in order[start : start + 8]], 12)
        live = teacher.score(rollouts, "topk", 20, entropy=True)
        stored = store.signal(rollouts, 20, entropy=True)
        mask = rollouts.completion_mask.bool()
        assert torch.equal(stored.token_logprobs, live.token_logprobs)
        assert torch.equal(stored.topk_ids[mask], live.topk_ids[mask])
        assert torch.equal(stored.topk_logprobs[mask], live.topk_logprobs[mask])
        assert torch.equal(stored.entropy[mask], live.entropy[mask])
        assert torch.equal(store.signal(rollouts, 5, entropy=False).topk_ids[mask], live.topk_ids[mask][:, :5])


def losses(config: dict, steps: int = 4) -> tuple[list[float], list[str]]:
    """Losses of ``steps`` train steps and the source of each batch the live teacher scored."""
    from opdkit.train import setup, train_step

    run = setup(load_config(base=config))
    live = run.teacher.live if isinstance(run.teacher, StoredTeacher) else run.teacher
    scored, score = [], live.score
    live.score = lambda rollouts, *args, **kwargs: scored.append(rollouts.source) or score(rollouts, *args, **kwargs)
    optimizer = torch.optim.AdamW(run.student.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    rng = random.Random(config["seed"])
    torch.manual_seed(config["seed"])
    return [train_step(run, optimizer, scheduler, rng)["loss"] for _ in range(steps)], scored


def test_a_run_on_stored_signals_never_calls_the_teacher_on_dataset_states_and_trains_identically(scored):
    config, manifest = scored
    config = {**config, "data": {**config["data"], "eval": None}}  # no held-out evaluation: only the steps
    config["checkpoint"] = {"best_metric": None}
    live_losses, live_sources = losses(config)
    stored_losses, stored_sources = losses({**config, "data": {**config["data"], "teacher_signals": manifest["folder"]}})
    assert "dataset" in live_sources and "student" in live_sources
    assert stored_sources == [s for s in live_sources if s == "student"]
    assert stored_losses == live_losses


def refused(config: dict, signals: str, match: str) -> None:
    from opdkit.train import setup

    with pytest.raises(OPDError, match=match):
        setup(load_config(base={**config, "data": {**config["data"], "teacher_signals": signals}}))


def test_a_store_that_does_not_match_the_run_is_refused_naming_the_field(tiny, scored, tmp_path):
    config, manifest = scored
    folder = manifest["folder"]
    refused({**config, "teacher": {"path": str(tiny / "student")}}, folder, r"teacher\.fingerprint .* re-run opd score-teacher")
    refused({**config, "teacher": {**config["teacher"], "dtype": "bf16"}}, folder, r"teacher\.dtype is 'float32' there and 'bfloat16'")
    tokenizer = load_tokenizer(str(tiny / "student"))
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(tmp_path / "other-student")
    load_model(str(tiny / "student")).save_pretrained(tmp_path / "other-student")
    refused({**config, "student": {"path": str(tmp_path / "other-student")}}, folder, "tokenizer is")
    lines = (tiny / "train.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["completion"] = record["completion"] + " 0"
    (tmp_path / "edited.jsonl").write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    refused({**config, "data": {**config["data"], "train": str(tmp_path / "edited.jsonl")}}, folder, "data is")
    refused({**config, "rollout": {**config["rollout"], "max_completion_length": 16}}, folder,
            "source.max_completion_length is 12 there and 16")
    refused({**config, "diagnostics": {"top_k": 50}}, folder, r"top-20 .* top-50 .* opd score-teacher --top-k 50")
    refused({**config, "objective": {**GKD_TOPK, "lmbda": 1.0}}, folder, "only on student samples")
    refused({**config, "objective": {"method": "seqkd"}}, folder, "on dataset states, which this objective never draws")
    refused({**config, "objective": {"method": "gkd", "lmbda": 0.5}}, folder, "support full")
    refused(config, str(tmp_path / "nowhere"), r"no manifest.json\): write them with opd score-teacher")


def test_seqkd_reads_the_teachers_stored_samples_and_their_signals(tiny, tiny_config, tmp_path):
    """--source teacher (the default for states: teacher) stores one teacher sample per prompt; a seqkd run serves
    both the sample and its signal from the store, and the live teacher is never asked during the steps."""
    config = {**tiny_config, "objective": {"method": "seqkd"}, "data": {**tiny_config["data"], "eval": None},
              "checkpoint": {"best_metric": None}}
    manifest = score_teacher(load_config(base=config), tmp_path / "samples")
    assert manifest["source"] == {"kind": "teacher", "max_completion_length": 12, "temperature": 1.0, "top_p": 1.0}
    teacher, tokenizer = live_teacher(tiny)
    examples = load_examples(config["data"]["train"])
    torch.manual_seed(config["seed"])
    first = teacher.sample(examples[:8], 12)  # the scoring's first batch, drawn again with the same seed
    stored_teacher = StoredTeacher(teacher, SignalStore.open(manifest["folder"]), tokenizer, torch.device("cpu"))
    served = stored_teacher.sample(examples[:8], 12)
    assert served.source == "teacher" and served.texts(tokenizer) == first.texts(tokenizer)
    assert torch.equal(stored_teacher.score(served, "topk", 20, True).token_logprobs,
                       teacher.score(served, "topk", 20, True).token_logprobs)

    from opdkit.train import setup, train_step

    run = setup(load_config(base={**config, "data": {**config["data"], "teacher_signals": manifest["folder"]}}))
    calls = []
    run.teacher.live.score = run.teacher.live.sample = lambda *args, **kwargs: calls.append(args)
    optimizer = torch.optim.AdamW(run.student.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    record = train_step(run, optimizer, scheduler, random.Random(0))
    assert calls == [] and record["sources"] == ["teacher"] and record["loss"] > 0


def test_score_teacher_command_summarises_and_keeps_an_existing_folder(tiny_config, tmp_path, capsys):
    import yaml

    from opdkit.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**tiny_config, "objective": GKD_TOPK}))
    out = tmp_path / "signals"
    assert main(["score-teacher", str(path), "--out", str(out), "--top-k", "8", "--set", "diagnostics.top_k=0"]) == 0
    printed = capsys.readouterr().out
    assert "scored 64 dataset examples" in printed and "top-8" in printed and " MiB in " in printed
    assert json.loads((out / "manifest.json").read_text())["k"] == 8 and not (tmp_path / "signals.tmp").exists()
    assert main(["score-teacher", str(path), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().out
    assert main(["score-teacher", str(path), "--out", str(tmp_path / "other"), "--top-k", "3"]) == 2
    assert "--top-k 3 is fewer than the 20" in capsys.readouterr().out
