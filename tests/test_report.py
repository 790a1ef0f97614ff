"""``opd report``: the page a person reads to see why a run went wrong. What it must hold (every checklist item,
with what the run cannot know marked), that token text cannot inject markup, that old run folders still get a
page, that a real browser renders it (every plot, every heading, no console error, not blank), and that a real
run's folder works end to end."""

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from opdkit.cli import main
from opdkit.config import dump_config, load_config
from opdkit.errors import OPDError
from opdkit.methods import METHODS
from opdkit.report import SECTIONS, Unknown, build_report, checklist, checklist_html, read_arm, read_run, write_report
from opdkit.train import setup, train

HOSTILE = "<script>alert('token')</script>"
TOPICS = ["Teacher and student, tokenizers, teacher access", "State source", "Support",
          "Divergence, estimator and gradient path", "Temporal credit", "Routing", "Gates and weights", "Regularizers",
          "Loss aggregation and masks", "Compute", "Diagnostics over training, seeds and variance", "Evaluation"]


def _evaluation(accuracy: float) -> dict:
    return {"accuracy": accuracy, "reverse_kl": 1 - accuracy, "token_agreement": 0.3 + accuracy / 2,
            "greedy_match": accuracy / 2, "mean_length": 9.0}


def _step(step: int, diagnostics: bool) -> dict:
    """A step record as the loop writes it: today's keys, and with ``diagnostics`` the contract's new ones."""
    record = {"step": step, "loss": 1 / step, "grad_norm": 1.5, "lr": 1e-3, "completion_length": 10.0 + step,
              "truncation_rate": 0.125, "tokens_per_s": 400.0, "peak_memory_mib": 700.0, "sources": ["student"],
              "time_rollout": 0.3, "time_teacher": 0.1, "time_forward_backward": 0.4, "time_optimizer": 0.05,
              "reverse_kl_k1": 1 / step, "student_entropy": 2 - 0.1 * step, "advantage": -0.1}
    if diagnostics:
        record.update({
            "signal_mean": -0.2, "signal_negative_share": 0.6, "signal_skew": -1.0, "log_ratio_abs_p999": 5.0,
            "teacher_entropy": 1.0, "entropy_gap": -0.5, "student_topk_mass": 0.9, "teacher_topk_mass": 0.95,
            "topk_overlap": 0.7, "repeated_ngram_share": 0.05 * step, "loss_share_first30": 0.5,
            "loss_share_last30": 0.2,
            "by_position": {"edges": [0, 8, 16, 24, 32], "tokens": [80, 60, 20, 0],
                            "signal_mean": [-0.1 * step, -0.2, 0.1, None], "log_ratio_abs_p999": [4, 3, 2, None],
                            "teacher_entropy": [1, 0.8, 0.6, None], "topk_overlap": [0.8, 0.7, 0.6, None]}})
    return record


def _rollout(rng: random.Random) -> dict:
    tokens = [HOSTILE, " 12", "+", "3", "\n", "=", " 15", "</s>"]
    log_ratio = [rng.gauss(-0.3, 1) for _ in tokens]
    return {"prompt": "What is 12+3? <img src=x onerror=alert(1)>", "tokens": tokens, "log_ratio": log_ratio,
            "divergence": [abs(r) / 2 for r in log_ratio], "divergence_kind": "topk",
            "student_entropy": [1.0] * 8, "teacher_entropy": [0.5] * 8, "teacher_rank": [1, 3, None, 2, 1, 1, 4, 1],
            "overlap": [0.5] * 8, "loss": [-r for r in log_ratio], "high_loss": [r < -1 for r in log_ratio],
            "low_divergence": [abs(r) < 0.5 for r in log_ratio]}


def write_run(root: Path, *, steps: int = 4, diagnostics: bool = True, finished: bool = True, **config) -> Path:
    """A run folder following the run-folder contract, without training: ``diagnostics=False`` writes one as
    opdkit did before them (no new step keys, no tokens.jsonl, no samples.jsonl)."""
    root.mkdir(parents=True, exist_ok=True)
    tree = {"output_dir": str(root), "student": {"path": "models/student"}, "teacher": {"path": "models/teacher"},
            "data": {"train": "train.jsonl", "eval": "heldout.jsonl", "task": "arithmetic"},
            "optim": {"steps": steps}, "eval": {"every": 2}, **config}
    dump_config(load_config(base=tree), root / "config.yaml")
    records = [{"step": 0, "eval": _evaluation(0.2), "teacher": {"accuracy": 0.9}}]
    for step in range(1, steps + 1):
        records.append(_step(step, diagnostics))
        if step == 2:
            records[-1]["eval"] = _evaluation(0.4)
            if diagnostics:
                records[-1]["alerts"] = [{"detector": "entropy_collapse", "step": 2, "message": "entropy <b>fell</b>",
                                          "cause": "mode seeking", "try": "entropy_coef: 0.01", "value": 0.03,
                                          "threshold": 0.25}]
    if finished:
        records.append({"step": steps, "eval": _evaluation(0.6), "final": True, "wall_s": 12.0, "train_s": 9.0})
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if diagnostics:
        rng = random.Random(0)
        kept = [{"step": s, "high_loss_fraction": 0.1, "rollouts": [_rollout(rng) for _ in range(4)]}
                for s in (1, 2, steps)]
        (root / "tokens.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        (root / "samples.jsonl").write_text(json.dumps(
            {"step": steps, "samples": [{"prompt": "1+1", "student": HOSTILE, "teacher": "2"}]}) + "\n")
    return root


# ---- content --------------------------------------------------------------------------------------------

def test_the_checklist_fills_every_item_and_marks_what_the_run_cannot_know(tmp_path):
    items = checklist(read_run(write_run(tmp_path / "run")))
    assert [item.topic for item in items] == TOPICS and all(item.facts for item in items)
    facts = {item.topic: " | ".join(item.facts) for item in items}
    unknown = [fact for item in items for fact in item.facts if isinstance(fact, Unknown)]
    assert "pass@k: not measured: the evaluation is greedy pass@1" in unknown
    assert any(fact.startswith("cold start: not known") for fact in unknown)
    assert any(fact.startswith("variance over seeds: not known") for fact in unknown)
    # filled from the resolved config ...
    assert "teacher access: full-vocabulary log-probs (logits); this method reads the sampled tokens' log-probs" \
        in facts[TOPICS[0]]
    assert "estimator: k1" in facts[TOPICS[3]] and "policy gradient" in facts[TOPICS[3]]
    assert "gamma 0" in facts["Temporal credit"] and "token mean" in facts["Loss aggregation and masks"]
    # ... and from the logs
    assert "pass@1: held-out greedy accuracy 20.0% before, 60.0% after" in facts["Evaluation"]
    assert "teacher's held-out accuracy 90.0% against the student's 60.0% after" in facts["Evaluation"]
    assert "token tables (tokens.jsonl) at steps 1, 2, 4" in facts[TOPICS[10]]
    assert "peak memory: 700 MiB" in facts["Compute"] and "wall-clock: 12.0s" in facts["Compute"]

    page = checklist_html(items)
    assert all(topic in page for topic in TOPICS)
    assert page.count('<li class="unknown">') == len(unknown)


def test_the_checklist_follows_the_objective_and_the_teacher(tmp_path):
    server = {"kind": "server", "base_url": "http://127.0.0.1:8000/v1", "model": "t", "top_k": 20}
    run = write_run(tmp_path / "run", teacher=server,
                    objective={"method": "gkd", "support": "teacher_topk", "top_k": 8, "lmbda": 1.0})
    facts = {item.topic: " | ".join(item.facts) for item in checklist(read_run(run))}
    assert "sampled-token log-probs and its top 20 per position; this method reads the teacher's top 8" in facts[TOPICS[0]]
    assert "K = 8" in facts["Support"] and "renormalised over the top-K" in facts["Support"]
    assert "divergence: jsd (beta 0.5)" in facts[TOPICS[3]] and "backpropagated directly" in facts[TOPICS[3]]
    assert facts["Temporal credit"].startswith("not applicable")
    assert "teacher calls: not logged by this run" in facts["Compute"]


def test_token_text_and_logged_strings_cannot_inject_markup(tmp_path):
    page = build_report(write_run(tmp_path / "run"))
    assert "<script" not in page.lower() and "<img" not in page and "<b>fell</b>" not in page
    assert "&lt;script&gt;alert(&#x27;token&#x27;)&lt;/script&gt;" in page  # shown as text, in a coloured span
    assert 'class="tok" style="background:rgba(' in page
    assert "entropy &lt;b&gt;fell&lt;/b&gt;" in page


def test_an_old_run_folder_still_gets_a_page_that_says_what_it_lacks(tmp_path):
    run = write_run(tmp_path / "old", diagnostics=False, finished=False)
    page = build_report(run)
    assert all(f"<h2>{title}</h2>" in page for title in SECTIONS)
    assert "token tables (tokens.jsonl): not logged by this run" in page
    assert "signal by position (by_position): not logged by this run" in page
    assert "No detector fired, or none ran" in page
    assert "4 of 4 steps logged: the run has not finished" in page
    assert page.count("<svg") >= 1  # the training curves it did log
    facts = [fact for item in checklist(read_run(run)) for fact in item.facts]
    assert Unknown("token tables (tokens.jsonl): not logged by this run") in facts
    assert any(isinstance(f, Unknown) and f.startswith("not logged by this run: teacher_entropy") for f in facts)


def test_a_folder_that_is_not_a_run_is_refused_with_the_fix(tmp_path, capsys):
    with pytest.raises(OPDError, match=r"no config.yaml and no metrics.jsonl.*opd train CONFIG"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().out


# ---- in a real browser ----------------------------------------------------------------------------------

def test_an_arm_gathers_its_seeds_from_several_globs_and_refuses_two_runs_of_one_seed(tmp_path):
    for seed, folder in [(0, "a/s0"), (1, "a/s1"), (2, "b/seed2"), (3, "b/seed3")]:
        write_run(tmp_path / folder, seed=seed)
    write_run(tmp_path / "b/unfinished4", seed=4, finished=False)  # not finished: left out
    label, logs = read_arm(f"GKD, lr=1e-4={tmp_path}/a/s*,{tmp_path}/b/seed*,{tmp_path}/b/unfinished*")
    assert label == "GKD, lr=1e-4"
    assert [log.config.seed for log in logs] == [0, 1, 2, 3]
    assert [log.run_dir.name for log in logs] == ["s0", "s1", "seed2", "seed3"]
    label, logs = read_arm(f"x={tmp_path}/a/s*,{tmp_path}/a/s0")  # one folder matched twice counts once
    assert [log.config.seed for log in logs] == [0, 1]
    write_run(tmp_path / "b/again0", seed=0)
    with pytest.raises(OPDError, match="several finished runs of seed 0.*narrow the globs"):
        read_arm(f"x={tmp_path}/a/s*,{tmp_path}/b/*")


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed here when missing (the tests run as root); never a silent skip."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and installing it needs root: apt-get install -y chromium")
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode != 0:
            pytest.fail(f"chromium is missing and {' '.join(command)} failed: {done.stderr[-2000:]}")
    return shutil.which("chromium") or pytest.fail("apt-get installed chromium but it is not on PATH")


def _headless(chromium: str, page: Path, *action: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--enable-logging=stderr", "--v=0", "--window-size=1400,4000"]
    return subprocess.run([chromium, *flags, *action, page.resolve().as_uri()], capture_output=True, text=True,
                          timeout=120, cwd=page.parent)


@pytest.mark.slow
def test_the_page_renders_in_a_headless_browser(tmp_path, chromium):
    page = write_report(write_run(tmp_path / "run"))
    source = page.read_text()
    plots = source.count("<svg")
    # nothing to fetch: no link, import or script, and no address outside the file (inline data: images are in it;
    # the SVGs' XML namespaces are names, not addresses)
    assert not re.search(r"<link|<script|@import|(src|href)=[\"']?(?!data:)[a-z]+:|url\([\"']?(?!data:)[a-z]+:", source)

    dom = _headless(chromium, page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in dom.stdout, title
    # every figure and every panel in it made it into the rendered page: training curves, other per-step values,
    # the scatter, signal by position, per-step signals
    assert plots == 5 and dom.stdout.count("<svg") == plots
    assert source.count('<g id="axes_') == dom.stdout.count('<g id="axes_') >= 30
    assert 'class="checklist"' in dom.stdout and dom.stdout.count('<li class="unknown">') >= 3
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console

    shot = tmp_path / "report.png"
    done = _headless(chromium, page, f"--screenshot={shot}")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    # Pillow is there wherever a report can be drawn: matplotlib depends on it
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1400, 4000)
        rgb = np.asarray(image.convert("RGB")).astype(np.int32)
    colours = (rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]).ravel()
    inked = float((colours != 0xFFFFFF).mean())
    assert len(np.unique(colours)) > 50 and 0.05 < inked < 0.9, f"{inked:.1%} of the screenshot is not white"


# ---- end to end -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_real_runs_folder_gets_its_report(tiny_config, capsys):
    tiny_config["optim"] = {"steps": 2, "learning_rate": 1e-3}
    train(setup(load_config(base=tiny_config)))
    run_dir = Path(tiny_config["output_dir"])
    assert main(["report", str(run_dir), "--out", str(run_dir / "page.html")]) == 0
    assert capsys.readouterr().out.strip().endswith(str(run_dir / "page.html"))
    page = (run_dir / "page.html").read_text()
    assert all(f"<h2>{title}</h2>" in page for title in SECTIONS) and page.count("<svg") >= 1
    assert "2 steps, finished" in page and "held-out accuracy" in page


@pytest.mark.parametrize("method", METHODS)
def test_the_checklist_fills_in_for_every_method(tmp_path, method):
    chat = {"kind": "chat", "base_url": "http://127.0.0.1:8000/v1", "model": "t"}
    extra = {"teacher": chat} if method == "chunk_opd" else {}
    items = checklist(read_run(write_run(tmp_path / "run", objective={"method": method}, **extra)))
    assert [item.topic for item in items] == TOPICS and all(item.facts for item in items)
