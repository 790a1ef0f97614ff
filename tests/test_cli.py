"""The command line a person meets: what exists (methods, config keys, version), what a run shows and keeps
(banner, progress, Ctrl-C, final/ and samples), and managing runs (eval of a run folder, extending a finished
run, sweeps that skip finished runs, folder checks before any model loads)."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from opdkit import catalog
from opdkit.cli import main
from opdkit.config import Config, load_config
from opdkit.errors import OPDError
from opdkit.methods import METHODS
from opdkit.models import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def opd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opdkit.cli", *args], env=env or ENV, capture_output=True, text=True,
                          timeout=600)


def write_yaml(tree: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- finding out what exists ----------------------------------------------------------------------------

def test_version_methods_and_defaults_in_subprocesses():
    version = opd("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"opdkit {metadata.version('opdkit')}"

    listed = opd("methods", env={**ENV, "COLUMNS": "400"})
    assert listed.returncode == 0, listed.stderr
    for name in METHODS:
        line, _, values = catalog.method_summary(name)
        assert name in listed.stdout and line in listed.stdout, name
        assert catalog.preset_text(values) in listed.stdout, name

    defaults = opd("config", "--defaults")
    assert defaults.returncode == 0, defaults.stderr
    for section in catalog.sections():
        for key in section.keys:
            name = key.path.split(".")[-1]
            assert f"{name}: {key.default}  # {key.kind}. {key.help}" in defaults.stdout, key.path


def test_every_config_key_is_listed_with_help_and_docs_config_md_is_current():
    def leaves(model, prefix=""):
        for name, field in model.model_fields.items():
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                yield from leaves(sub, f"{prefix}{name}.")
            elif not (model is Config and name == "teacher"):
                yield f"{prefix}{name}"

    listed = {key.path: key for section in catalog.sections() for key in section.keys}
    assert set(leaves(Config)) <= set(listed)  # every leaf of the tree (teacher kinds aside) is there
    assert {"teacher.base_url", "teacher.chunk_length", "teacher.dtype"} <= set(listed)
    assert all(key.help for key in listed.values()), [k for k, v in listed.items() if not v.help]
    assert listed["optim.steps"].default == "100" and listed["student.path"].default == catalog.REQUIRED
    assert (ROOT / "docs" / "config.md").read_text() == catalog.config_markdown(), \
        "docs/config.md is stale: opd config --defaults --markdown > docs/config.md"


def test_config_command_prints_a_config_resolved(tiny_config, tmp_path, capsys):
    tiny_config["objective"] = {"method": "tropd"}
    path = write_yaml(tiny_config, tmp_path / "c.yaml")
    assert main(["config", str(path)]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["objective"]["trust_region"]["enabled"] is True  # the preset, filled in
    assert resolved["checkpoint"]["best_metric"] == "reverse_kl"  # auto, resolved for a local teacher


def test_best_metric_defaults_to_what_the_teacher_measures_and_refuses_what_it_cannot(tiny_config):
    server = {"kind": "server", "base_url": "http://127.0.0.1:1/v1", "model": "m"}
    chat = {"kind": "chat", "base_url": "http://127.0.0.1:1/v1", "model": "m"}
    assert load_config(base=tiny_config).checkpoint.best_metric == "reverse_kl"
    assert load_config(base={**tiny_config, "teacher": server}).checkpoint.best_metric == "reverse_kl_k1"
    chunk = {"method": "chunk_opd", "ref_kl_coef": 0.02}
    assert load_config(base={**tiny_config, "teacher": chat, "objective": chunk}).checkpoint.best_metric == "accuracy"
    no_task = {**tiny_config, "teacher": chat, "objective": chunk, "data": {**tiny_config["data"], "task": None}}
    assert load_config(base=no_task).checkpoint.best_metric == "token_agreement"
    no_eval = {**tiny_config, "data": {"train": tiny_config["data"]["train"]}}
    assert load_config(base=no_eval).checkpoint.best_metric is None

    with pytest.raises(OPDError, match="cannot be measured with a server teacher.*reverse_kl_k1"):
        load_config(base={**tiny_config, "teacher": server, "checkpoint": {"best_metric": "reverse_kl"}})
    with pytest.raises(OPDError, match="needs a verifier: set data.task"):
        load_config(base={**no_task, "teacher": tiny_config["teacher"], "objective": {},
                          "checkpoint": {"best_metric": "accuracy"}})
    with pytest.raises(OPDError, match="data.eval is not set"):
        load_config(base={**no_eval, "checkpoint": {"best_metric": "token_agreement"}})


def test_hub_ids_resolve_from_the_local_cache_and_say_what_to_do_when_absent(tiny, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someorg--tiny-student" / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny / "student", snapshot)
    (cache / "models--someorg--tiny-student" / "refs").mkdir()
    (cache / "models--someorg--tiny-student" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no folder named someorg/ here

    assert Path(resolve_model_path("someorg/tiny-student")) == snapshot
    with pytest.raises(OPDError, match=r"not in the local Hugging Face cache|nor a model in the local Hugging Face "
                                       r"cache.*hf download someorg/absent"):
        resolve_model_path("someorg/absent")


# ---- seeing what happens ---------------------------------------------------------------------------------

def test_a_run_shows_banner_before_evals_and_summary_and_keeps_samples_and_final(tiny_config, tmp_path, capsys):
    tiny_config.update(optim={"steps": 4, "learning_rate": 1e-3}, eval={"batch_size": 16, "every": 2},
                       logging={"samples": 2, "every": 2})
    path = write_yaml(tiny_config, tmp_path / "c.yaml")
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    order = ["opd train", "method", "student", "teacher", "precision", "decoding", "machine", "memory", "data", "steps",
             "checkpoints", "output", "first prompt", "before training:", "opd step 2/4", "eval at step 2:", "saved checkpoint-2",
             "held-out, before and after 4 steps of opd", "evaluation completions", "best checkpoint:",
             "final model:", "of which training steps"]
    positions = [out.index(text) for text in order]
    assert positions == sorted(positions), out
    assert "rendered with the student's chat template" in out
    assert "(llama_step)" in " ".join(out.split())  # the tiny Llama student decodes through opdkit's own step
    for needle in ("lr ", "gnorm ", "s/step", "rkl~k1 "):
        assert needle in out.split("opd step 2/4")[1].splitlines()[0]

    run_dir = Path(tiny_config["output_dir"])
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    latest = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint-4")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), latest.state_dict().values()))
    assert not (run_dir / "final" / "trainer_state.pt").exists()
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 2, 4]
    assert all(len(s["samples"]) == 2 and {"prompt", "student", "teacher", "answer"} <= set(s["samples"][0])
               for s in samples)
    final = records(run_dir)[-1]
    assert final["final"] and 0 < final["train_s"] < final["wall_s"]


def test_raw_prompts_for_base_models_and_a_truncation_warning(tiny_config, tmp_path, capsys):
    tiny_config["data"]["chat_template"] = False
    tiny_config["rollout"]["max_completion_length"] = 2  # the random student never ends in 2 tokens
    tiny_config["optim"]["steps"] = 3
    tiny_config["diagnostics"] = {"detectors": {"window": 1}}
    path = write_yaml(tiny_config, tmp_path / "c.yaml")
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "raw text (data.chat_template: false)" in out
    first = json.loads(Path(tiny_config["data"]["train"]).read_text().splitlines()[0])["prompt"]
    assert repr(first) in out.replace("\n", "") or first in out  # the prompt as sent: its text, no template
    assert "<|" not in out.split("first prompt")[1].splitlines()[1]
    assert out.count("of recent rollouts reached rollout.max_completion_length (2)") == 1  # once, though every step truncates
    alerts = [a for r in records(tmp_path / "run") for a in r.get("alerts", [])]
    assert [a["detector"] for a in alerts].count("truncation") == 1 and alerts[0]["step"] == 1


def test_serve_teacher_help_shows_defaults():
    shown = opd("serve-teacher", "--help", env={**ENV, "COLUMNS": "200"})
    assert shown.returncode == 0
    assert "(default: 8000)" in shown.stdout and "(default: 127.0.0.1)" in shown.stdout
    assert "(default: each)" in shown.stdout


def test_serve_teacher_logs_requests_and_prints_its_config(tiny):
    import httpx

    from opdkit.serve import RequestLog, config_snippet, create_app, serve_in_thread

    lines = []
    model = AutoModelForCausalLM.from_pretrained(tiny / "teacher")
    from opdkit.models import load_tokenizer

    app = create_app(model, load_tokenizer(str(tiny / "teacher")), "tiny", log=RequestLog("each", lines.append))
    with serve_in_thread(app) as base_url:
        httpx.get(f"{base_url}/models")
        httpx.post(f"{base_url}/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2})
    assert "GET /v1/models 200" in lines[0]
    assert "POST /v1/completions 200" in lines[1] and "3 prompt + 2 completion tokens" in lines[1]
    snippet = yaml.safe_load(config_snippet("0.0.0.0", 8123, "tiny", api_key=True))
    assert snippet["teacher"] == {"kind": "server", "base_url": "http://127.0.0.1:8123/v1", "model": "tiny",
                                  "api_key_env": "OPD_SERVE_API_KEY"}

    rates, clock = [], [0.0]
    log = RequestLog("rate", rates.append, interval_s=10)
    import opdkit.serve as serve_module

    original = serve_module.time.monotonic
    try:
        serve_module.time.monotonic = lambda: clock[0]
        log = RequestLog("rate", rates.append, interval_s=10)
        for t in (1.0, 5.0, 11.0):
            clock[0] = t
            log("POST", "/v1/completions", 200, 0.1, (10, 0))
    finally:
        serve_module.time.monotonic = original
    assert len(rates) == 1 and "3 requests in 11 s" in rates[0]


# ---- managing runs -----------------------------------------------------------------------------------------

def test_folder_checks_come_before_any_model_loads(tiny_config, tmp_path, monkeypatch, capsys):
    tiny_config["optim"]["steps"] = 2
    path = write_yaml(tiny_config, tmp_path / "c.yaml")
    assert main(["train", str(path)]) == 0
    run_dir = Path(tiny_config["output_dir"])

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the folder check")

    import opdkit.train as train_module

    monkeypatch.setattr(train_module, "load_model", must_not_load)
    monkeypatch.setattr(train_module, "load_student", must_not_load)
    monkeypatch.setattr(train_module, "load_tokenizer", must_not_load)
    capsys.readouterr()
    assert main(["train", str(path)]) == 2  # a fresh run into a folder with checkpoints
    assert "already holds checkpoints" in capsys.readouterr().out
    assert main(["train", "--resume", str(run_dir)]) == 2  # a finished run, not extended
    assert "already finished its 2 steps" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a run folder" in capsys.readouterr().out


def test_extending_a_finished_run_keeps_optimizer_and_schedule_state(tiny_config, tmp_path):
    tiny_config["optim"] = {"steps": 2, "learning_rate": 1e-3}
    path = write_yaml(tiny_config, tmp_path / "c.yaml")
    first = opd("train", str(path))
    assert first.returncode == 0, first.stdout + first.stderr
    run_dir = Path(tiny_config["output_dir"])
    finished_eval = records(run_dir)[-1]["eval"]
    extended = opd("train", "--resume", str(run_dir), "--set", "optim.steps=4")
    assert extended.returncode == 0, extended.stdout + extended.stderr
    out = " ".join(extended.stdout.split())
    assert "extending the finished run from 2 to 4 steps" in out and "horizon moves from 2 to 4" in out
    logged = records(run_dir)
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]
    assert next(r for r in logged if r["step"] == 2 and "loss" in r)["eval"] == finished_eval  # kept as a mid-run eval
    state = torch.load(run_dir / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    assert all(int(s["step"]) == 4 for s in state["optimizer"]["state"].values())  # Adam's moments carried on
    assert state["scheduler"]["last_epoch"] == 4
    assert load_config(run_dir / "config.yaml").optim.steps == 4


def test_eval_of_a_run_folder_and_of_the_untouched_student(tiny_config, tmp_path):
    tiny_config["optim"]["steps"] = 2
    tiny_config["eval"]["every"] = 1
    path = write_yaml(tiny_config, tmp_path / "c.yaml")
    assert main(["train", str(path)]) == 0
    run_dir = Path(tiny_config["output_dir"])
    logged = records(run_dir)

    untouched = opd("eval", str(run_dir), "--untouched")
    assert untouched.returncode == 0, untouched.stderr
    assert json.loads(untouched.stdout.strip().splitlines()[-1])["reverse_kl"] == pytest.approx(
        logged[0]["eval"]["reverse_kl"], rel=1e-5)
    best = opd("eval", str(run_dir))
    assert best.returncode == 0, best.stderr
    state = json.loads((run_dir / "best" / "trainer_state.json").read_text())
    assert json.loads(best.stdout.strip().splitlines()[-1])["reverse_kl"] == pytest.approx(state["best"]["value"], rel=1e-5)
    helped = opd("eval", "--help")
    assert all(flag in helped.stdout for flag in ("--checkpoint", "--untouched", "RUN_DIR|CONFIG"))


def test_sweep_reuses_finished_runs_and_refuses_stopped_ones_before_training(tiny_config, tmp_path):
    tiny_config["optim"] = {"steps": 1, "learning_rate": 1e-3}
    path = write_yaml(tiny_config, tmp_path / "c.yaml")
    out = tmp_path / "sweep"
    sweep = ("sweep", str(path), "--methods", "opd", "--seeds", "0,1", "--output-dir", str(out))
    assert opd(*sweep).returncode == 0
    table, logs = (out / "sweep.md").read_text(), sorted(out.glob("opd/seed*/metrics.jsonl"))
    written = [log.stat().st_mtime_ns for log in logs]
    # the table links each run's report, and every link leads to a page
    assert "| reports |" in table and "[seed 0](opd/seed0/report.html) [seed 1](opd/seed1/report.html)" in table
    assert all((out / "opd" / f"seed{seed}" / "report.html").is_file() for seed in (0, 1))

    again = opd(*sweep)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("finished earlier, reusing") == 2
    assert [log.stat().st_mtime_ns for log in logs] == written and (out / "sweep.md").read_text() == table
    # another thread count still reuses them; another learning rate is refused, naming the key, before any run
    assert opd(*sweep, "--set", "threads=1").stdout.count("finished earlier, reusing") == 2
    changed = opd(*sweep, "--set", "optim.learning_rate=2e-3")
    assert changed.returncode == 2 and "trained with another optim.learning_rate" in changed.stdout
    assert [log.stat().st_mtime_ns for log in logs] == written

    # a run stopped part-way: refused before anything trains (gkd would run first), continued with --resume
    stopped = logs[1]
    stopped.write_text("".join(line + "\n" for line in stopped.read_text().splitlines()[:-1]))
    refused = opd("sweep", str(path), "--methods", "gkd,opd", "--seeds", "0,1", "--output-dir", str(out))
    assert refused.returncode == 2 and "stopped part-way" in refused.stdout and "--resume" in refused.stdout
    assert not (out / "gkd").exists()


def test_bf16_on_a_processor_without_bf16_units_says_so(tiny_config, tmp_path, monkeypatch, capsys):
    import opdkit.console as console_module

    monkeypatch.setattr(console_module, "bf16_units", lambda: None)
    tiny_config.update(precision="bf16", optim={"steps": 1, "learning_rate": 1e-3})
    assert main(["train", str(write_yaml(tiny_config, tmp_path / "c.yaml"))]) == 0
    out = capsys.readouterr().out
    assert "precision bf16 on a processor without bf16 matrix units" in out and "bf16 autocast" in out


def test_ctrl_c_while_loading_is_one_line(tiny_config, tmp_path, monkeypatch, capsys):
    import opdkit.train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "setup", interrupted)
    path = write_yaml(tiny_config, tmp_path / "c.yaml")
    assert main(["train", str(path)]) == 130
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "interrupted while loading, before training started: nothing was written"
    assert "Traceback" not in out


def test_a_terminal_shows_banner_progress_and_acknowledges_ctrl_c_at_once(tiny_config, tmp_path):
    """Under a pseudo-terminal, as a person sees it: the banner, the live progress line (rate, ETA, s/step), and
    Ctrl-C (the byte a terminal sends) acknowledged at once, then a checkpoint and a clean exit."""
    import fcntl
    import termios

    tiny_config["optim"] = {"steps": 100000, "learning_rate": 1e-4}
    tiny_config["data"].pop("eval")
    path = write_yaml(tiny_config, tmp_path / "c.yaml")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, b"\x00\x28\x00\xc8\x00\x00\x00\x00")  # 40 rows x 200 columns

    def controlling_terminal():  # in the child: its own session, the pseudo-terminal (its stdin) controlling it
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen([sys.executable, "-m", "opdkit.cli", "train", str(path)], stdin=slave, stdout=slave,
                               stderr=slave, env={**ENV, "TERM": "xterm-256color"}, preexec_fn=controlling_terminal)
    os.close(slave)
    seen = b""

    def read_until(done, timeout: float) -> None:
        """Read the terminal (a child whose terminal is not read blocks) until ``done()``."""
        nonlocal seen
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, seen.decode(errors="replace")[-3000:]
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    return

    try:
        read_until(lambda: b"s/step" in seen, 300)  # the first step's line in the progress display
        os.write(master, b"\x03")  # Ctrl-C typed at the terminal
        read_until(lambda: b"stop asked: finishing step" in seen, 30)
        read_until(lambda: process.poll() is not None, 120)  # returns early when the child closes the terminal
        read_until(lambda: b"opd train --resume" in seen, 10)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    for needle in ("opd train", "method", "opd: Classic on-policy distillation", "teacher", "output", "ETA"):
        assert needle in text, needle
    assert process.returncode == 128 + signal.SIGINT
    assert "Traceback" not in text


def test_sweep_refuses_data_that_does_not_fit_a_method_before_any_run(tiny_config, tmp_path):
    """TrOPD's guidance prefix goes before the completion budget: 30 + 30 tokens after the prompt do not fit the
    tiny models' 64-token context, while classic OPD's 30 do. The sweep says so before opd's runs train."""
    from rich.console import Console

    from opdkit.sweep import run_sweep

    tiny_config["rollout"]["max_completion_length"] = 30
    tiny_config["optim"] = {"steps": 1, "learning_rate": 1e-3}
    path = write_yaml(tiny_config, tmp_path / "c.yaml")
    with pytest.raises(OPDError, match="guidance prefix of up to 30.*exceeds the model context of 64"):
        run_sweep(str(path), ["opd", "tropd"], [0], [], str(tmp_path / "s"), Console(width=300))
    assert not (tmp_path / "s" / "opd").exists()
