"""The token-level table (``opdkit.token_table``) and ``opd diagnose``.

- each per-token function on hand-built distributions whose answer is known: the teacher's rank (full and from
  an unsorted top-k), the top-k overlap, the top-k KL with its tail (a lower bound, exact when the tails split
  alike), entropies, the high-loss and low-divergence flags;
- the records: one entry per completion token, padding left out, None where the inputs cannot give a field;
- ``opd diagnose`` on the tiny models: the files and the summary, a local teacher against the same teacher
  served with its whole vocabulary as top-k (the same table), and the refusals before any model loads.
"""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml

from opdkit.cli import main
from opdkit.diagnostics import near_future_share
from opdkit.models import load_model, load_tokenizer
from opdkit.objectives.divergence import entropy, kl
from opdkit.rollout import Rollouts
from opdkit.serve import create_app, serve_in_thread
from opdkit.teachers import TeacherSignal
from opdkit.token_table import (BEYOND_TOPK, TokenStats, low_divergence, records, reverse_kl_topk, teacher_rank,
                                teacher_rank_topk, token_stats, token_table, topk_overlap)

log = lambda *p: torch.tensor(p, dtype=torch.float32).log()  # noqa: E731
TOKENIZER = SimpleNamespace(batch_decode=lambda rows: [f"<{r[0]}>" for r in rows],
                            decode=lambda ids, skip_special_tokens: "".join(f"<{i}>" for i in ids.tolist()))


# ---- the per-token functions ---------------------------------------------------------------------------------


def test_teacher_rank_counts_more_likely_tokens_and_ties_share_the_better_rank():
    teacher = log(0.1, 0.4, 0.3, 0.2).expand(1, 4, 4)
    assert teacher_rank(teacher, torch.tensor([[1, 2, 3, 0]])).tolist() == [[1, 2, 3, 4]]
    tied = log(0.4, 0.4, 0.2).view(1, 1, 3)
    assert teacher_rank(tied, torch.tensor([[1]])).item() == 1
    assert teacher_rank(tied, torch.tensor([[2]])).item() == 3


def test_teacher_rank_from_an_unsorted_topk_is_exact_inside_and_unknown_beyond():
    ids, values = torch.tensor([[[2, 0, 3]]]).expand(1, 4, 3), log(0.3, 0.5, 0.1).expand(1, 4, 3)
    got = teacher_rank_topk(ids, values, torch.tensor([[0, 2, 3, 1]]))
    assert got.tolist() == [[1, 2, 3, BEYOND_TOPK]]


def test_topk_overlap_is_the_shared_share_of_the_two_topk():
    student = log(0.4, 0.3, 0.2, 0.1).view(1, 1, 4)
    assert topk_overlap(student, torch.tensor([[[1, 3]]])).item() == 0.5  # student's top-2 {0, 1}
    assert topk_overlap(student, torch.tensor([[[1, 0]]])).item() == 1.0
    assert topk_overlap(student, torch.tensor([[[2, 3]]])).item() == 0.0
    assert topk_overlap(student, torch.tensor([[[2, 1, 0]]])).item() == 1.0  # top-3 {0, 1, 2}


def test_topk_kl_keeps_the_tail_as_one_category():
    student = log(0.5, 0.2, 0.2, 0.1).view(1, 1, 4)
    ids, teacher_topk = torch.tensor([[[1, 0]]]), log(0.5, 0.25).view(1, 1, 2)
    want = 0.5 * math.log(0.5 / 0.25) + 0.2 * math.log(0.2 / 0.5) + 0.3 * math.log(0.3 / 0.25)
    assert reverse_kl_topk(student, ids, teacher_topk).item() == pytest.approx(want, rel=1e-5)
    # a lower bound of the full KL, equal to it when both tails split alike (student 2:1, teacher 2:1)
    uneven = log(0.25, 0.5, 0.05, 0.2).view(1, 1, 4)
    assert reverse_kl_topk(student, ids, teacher_topk).item() < kl(student, uneven).item()
    alike = log(0.25, 0.5, 0.25 * 2 / 3, 0.25 / 3).view(1, 1, 4)
    assert reverse_kl_topk(student, ids, teacher_topk).item() == pytest.approx(kl(student, alike).item(), rel=1e-5)


def test_entropy_of_known_distributions():
    assert entropy(log(0.25, 0.25, 0.25, 0.25)).item() == pytest.approx(math.log(4))
    assert entropy(log(0.5, 0.5)).item() == pytest.approx(math.log(2))


def test_low_divergence_is_below_the_pooled_median_of_real_positions():
    divergence = torch.tensor([[0.1, 0.5, 9.0], [0.2, 0.3, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])  # the padding's 0.0 must not count, nor be flagged
    # masked values 0.1, 0.5, 9.0, 0.2, 0.3: median 0.3
    assert low_divergence(divergence, mask).tolist() == [[True, False, False], [True, False, False]]
    assert low_divergence(divergence, mask, threshold=1.0).tolist() == [[True, True, False], [True, True, False]]


# ---- token_stats and the records ------------------------------------------------------------------------------


def _batch():
    """Two rollouts over V = 4: the first 3 tokens long, the second 2 (one padding position)."""
    ids = torch.tensor([[1, 2, 3], [0, 1, 0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    rollouts = Rollouts(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), ids, mask,
                        torch.tensor([True, False]), [], "student")
    student = log(0.4, 0.3, 0.2, 0.1).expand(2, 3, 4).clone()
    teacher = log(0.1, 0.4, 0.3, 0.2).expand(2, 3, 4).clone()
    return rollouts, student, teacher


def test_token_stats_with_the_teachers_full_distribution():
    rollouts, student, teacher = _batch()
    signal = TeacherSignal(teacher.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1), logprobs=teacher)
    stats = token_stats(rollouts, student, student.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1),
                        signal, top_k=2)
    assert stats.divergence_kind == "full" and stats.top_k == 2
    # token 1: log 0.4 - log 0.3; token 2: log 0.3 - log 0.2; token 3: log 0.2 - log 0.1; token 0: log 0.1 - log 0.4
    torch.testing.assert_close(stats.log_ratio[0], torch.tensor([math.log(4 / 3), math.log(1.5), math.log(2)]))
    assert stats.log_ratio[1, 2] == 0  # padding
    assert stats.teacher_rank.tolist() == [[1, 2, 3], [4, 1, 0]]
    torch.testing.assert_close(stats.divergence[0], kl(student[0], teacher[0]))
    assert stats.overlap[0, 0].item() == 0.5  # student top-2 {0, 1}, teacher top-2 {1, 2}
    torch.testing.assert_close(stats.teacher_entropy[0], entropy(teacher[0]))
    torch.testing.assert_close(stats.student_entropy[0], entropy(student[0]))


def test_hidden_states_and_head_give_the_same_table_as_logprobs():
    rollouts, student, _ = _batch()
    head = torch.nn.Linear(3, 4, bias=False)
    hidden = torch.randn(2, 3, 3)
    teacher = head(hidden).log_softmax(-1).detach()
    token = teacher.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1)
    s_token = student.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1)
    a = token_stats(rollouts, student, s_token, TeacherSignal(token, logprobs=teacher))
    b = token_stats(rollouts, student, s_token, TeacherSignal(token, hidden=hidden, head=head))
    for name in ("divergence", "teacher_entropy", "teacher_rank", "overlap"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name))


def test_records_have_one_entry_per_token_and_none_where_unknown():
    rollouts, student, teacher = _batch()
    ids = rollouts.completion_ids
    topk_ids = torch.tensor([2, 1]).expand(2, 3, 2)  # the teacher's top-2, unsorted; token 3 and 0 lie beyond
    topk = teacher.gather(-1, topk_ids)
    signal = TeacherSignal(teacher.gather(-1, ids.unsqueeze(-1)).squeeze(-1), topk_ids=topk_ids, topk_logprobs=topk)
    s_token = student.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    loss = torch.arange(6.0).view(2, 3)
    rows = token_table(rollouts, student, s_token, signal, loss, TOKENIZER, 0.4)
    json.dumps(rows)  # JSON as it is
    assert [r["tokens"] for r in rows] == [["<1>", "<2>", "<3>"], ["<0>", "<1>"]]
    keys = ("log_ratio", "divergence", "student_entropy", "overlap", "loss", "high_loss", "low_divergence",
            "teacher_rank")
    for row in rows:
        assert row["prompt"] == "<0>" and row["divergence_kind"] == "topk"
        assert all(len(row[k]) == len(row["tokens"]) for k in keys)
        assert row["teacher_entropy"] is None  # a top-k alone does not give it
    assert rows[0]["teacher_rank"] == [1, 2, None] and rows[1]["teacher_rank"] == [None, 1]
    assert rows[1]["loss"] == [3.0, 4.0]
    # k1 = -log_ratio: 1 -> log(0.3/0.4), 2 -> log(0.2/0.3), 3 -> log(0.1/0.2), 0 -> log(0.4/0.1) (the largest),
    # then 1 again; top 40% of 5 positions = 2: the 0 and, tied at log(3/4), the first of the two 1s
    assert rows[1]["high_loss"][0] is True and sum(sum(r["high_loss"]) for r in rows) == 2
    assert sum(sum(r["low_divergence"]) for r in rows) <= 2  # strictly below the median of 5

    only_tokens = token_table(rollouts, None, s_token, signal, None, TOKENIZER, 0.4)
    for row in only_tokens:  # the loop may have the student's token log-probs alone
        assert row["divergence"] is row["low_divergence"] is row["overlap"] is row["student_entropy"] is None
        assert row["divergence_kind"] is None and row["loss"] is None
        assert len(row["high_loss"]) == len(row["tokens"]) and row["teacher_rank"] is not None


def test_pooled_batches_flag_like_one_batch():
    rollouts, student, teacher = _batch()
    ids = rollouts.completion_ids
    signal = TeacherSignal(teacher.gather(-1, ids.unsqueeze(-1)).squeeze(-1), logprobs=teacher)
    s_token = student.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    whole = token_stats(rollouts, student, s_token, signal)
    halves = []
    for rows in ([0], [1]):
        part = Rollouts(rollouts.prompt_ids[rows], rollouts.prompt_mask[rows], ids[rows][:, : 3 - rows[0]],
                        rollouts.completion_mask[rows][:, : 3 - rows[0]], rollouts.truncated[rows], [], "student")
        halves.append(token_stats(part, student[rows][:, : 3 - rows[0]], s_token[rows][:, : 3 - rows[0]],
                                  TeacherSignal(signal.token_logprobs[rows][:, : 3 - rows[0]],
                                                logprobs=teacher[rows][:, : 3 - rows[0]])))
    pooled = TokenStats.cat(halves)
    assert records(pooled, ["", ""], TOKENIZER, 0.4) == records(whole, ["", ""], TOKENIZER, 0.4)


# ---- opd diagnose ---------------------------------------------------------------------------------------------


def _diagnose(tiny_config, tmp_path, name: str, *extra: str) -> tuple[dict, list[dict], list[dict]]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    out = tmp_path / name
    assert main(["diagnose", str(path), "--prompts", "6", "--out", str(out), *extra]) == 0
    summary = json.loads((out / "summary.json").read_text())
    (line,) = (out / "tokens.jsonl").read_text().splitlines()
    table = json.loads(line)
    with (out / "tokens.csv").open() as f:
        rows = list(csv.DictReader(f))
    return summary, table, rows


def test_diagnose_writes_the_table_csv_and_summary(tiny_config, tmp_path, capsys):
    summary, table, rows = _diagnose(tiny_config, tmp_path, "local")
    assert table["step"] == 0 and table["high_loss_fraction"] == 0.1 and len(table["rollouts"]) == 6
    tokens = sum(len(r["tokens"]) for r in table["rollouts"])
    assert summary["tokens"] == tokens == len(rows) and summary["prompts"] == 6
    assert list(rows[0]) == ["rollout", "position", "token", "log_ratio", "divergence", "student_entropy",
                             "teacher_entropy", "teacher_rank", "overlap", "high_loss", "low_divergence"]
    assert summary["divergence_kind"] == "full" and summary["top_k"] == 20
    assert summary["outside_teacher_topk_share"] == 0.0  # V = 20: every token is within the top 20
    ratios = torch.tensor([x for r in table["rollouts"] for x in r["log_ratio"]])
    assert summary["log_ratio_abs_mean"] == pytest.approx(float(ratios.abs().mean()), rel=1e-4)
    assert summary["signal_negative_share"] == pytest.approx(float((ratios < 0).float().mean()))
    assert [s["fraction"] for s in summary["near_future"]] == [0.05, 0.1, 0.2]
    # the near-future share of the summary is the diagnostic's over the written table
    k1 = [torch.tensor([-x for x in r["log_ratio"]]) for r in table["rollouts"]]
    divergence = [torch.tensor(r["divergence"]) for r in table["rollouts"]]
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # noqa: E731
    mask = pad([torch.ones(len(x)) for x in k1])
    share = near_future_share(pad(k1), pad(divergence), mask, fraction=0.1)
    assert summary["near_future"][1]["share"] == pytest.approx(share.share)
    assert sum(sum(r["high_loss"]) for r in table["rollouts"]) == math.ceil(0.1 * tokens)
    assert len(summary["highest_loss"]) == 5 and "[" in summary["highest_loss"][0]["context"]
    shown = capsys.readouterr().out
    assert "near-future share" in shown and "high-loss tokens" in shown and "tokens.jsonl" in shown


def test_a_served_teacher_with_its_whole_vocabulary_gives_the_local_table(tiny, tiny_config, tmp_path):
    local, local_table, _ = _diagnose(tiny_config, tmp_path, "local")
    model, tokenizer = load_model(str(tiny / "teacher")), load_tokenizer(str(tiny / "teacher"))
    with serve_in_thread(create_app(model, tokenizer, "t")) as url:
        tiny_config["teacher"] = {"kind": "server", "base_url": url, "model": "t", "top_k": 20}
        served, served_table, _ = _diagnose(tiny_config, tmp_path, "served")
    assert served["divergence_kind"] == "topk" and served["teacher_entropy_mean"] is None
    for a, b in zip(local_table["rollouts"], served_table["rollouts"]):
        assert a["tokens"] == b["tokens"] and a["teacher_rank"] == b["teacher_rank"]
        assert a["log_ratio"] == pytest.approx(b["log_ratio"], abs=1e-4)
        assert a["divergence"] == pytest.approx(b["divergence"], abs=1e-4)  # top-20 of 20 + an empty tail: the full KL


def test_diagnose_of_a_checkpoint_and_refusals_before_any_model_loads(tiny_config, tmp_path, monkeypatch, capsys):
    tiny_config["optim"]["steps"] = 2
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["train", str(path)]) == 0
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert main(["diagnose", str(path), "--checkpoint", str(checkpoint), "--prompts", "3"]) == 0
    out = tmp_path / "run" / "diagnose" / "checkpoint-2"  # the default: beside the checkpoint
    assert json.loads((out / "summary.json").read_text())["step"] == 2

    import opdkit.diagnose as diagnose_module

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(diagnose_module, "load_student", must_not_load)
    capsys.readouterr()
    assert main(["diagnose", str(path), "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().out
    assert main(["diagnose", str(path), "--checkpoint", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().out
    assert main(["diagnose", str(path), "--prompts", "0"]) == 2
    tiny_config["teacher"] = {"kind": "chat", "base_url": "http://127.0.0.1:9/v1", "model": "t"}
    tiny_config["objective"] = {"method": "chunk_opd"}
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["diagnose", str(path)]) == 2
    assert "text only" in capsys.readouterr().out
