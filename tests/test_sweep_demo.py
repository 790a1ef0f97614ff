"""``opd sweep`` with any teacher and without matplotlib, presets over the config in a sweep, and ``opd demo``'s
verdict and machine line."""

import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from opdkit.config import load_config
from opdkit.demo import run_demo, verdict
from opdkit.models import machine_description, pick_device, resolve_precision
from opdkit.sweep import markdown_table, plot, plotted_metric, run_sweep, sweep_configs


def _console() -> Console:
    return Console(record=True, width=400)


# (eval result, metric column headers, their cells, plotted metric): local, server and chat teachers, with and
# without a task. The table shows accuracy where a task measured it, else token agreement, then the KL the teacher
# allows.
TEACHERS = [
    ({"accuracy": 0.25, "reverse_kl": 1.5, "token_agreement": 0.4},
     "held-out accuracy | exact reverse KL to teacher (nats/token)", "25.0% | 1.5000", "accuracy"),
    ({"accuracy": None, "reverse_kl_k1": 0.7, "token_agreement": 0.4},
     "token agreement with teacher | reverse KL to teacher, k1 estimate (nats/token)", "40.0% | 0.7000", "reverse_kl_k1"),
    ({"accuracy": 0.5, "token_agreement": 0.4}, "held-out accuracy", "50.0%", "accuracy"),
    ({"accuracy": None, "token_agreement": 0.4}, "token agreement with teacher", "40.0%", "token_agreement"),
]


@pytest.mark.parametrize("measured, header, cells, metric", TEACHERS)
def test_table_and_plot_use_what_the_teacher_measured(tiny_config, tmp_path, measured, header, cells, metric):
    runs = {"opd": [{"seed": 0, "before": measured, "after": measured, "wall_s": 3.0, "tokens_per_s": 100.0,
                     "extra_teacher_tokens": 0.0, "evals": [(0, measured), (2, measured)]}]}
    table = markdown_table(runs, load_config(base=tiny_config), "c.yaml", ["opd"], [0], [])
    assert f"| method | {header} | tokens/s | wall time (s) | extra teacher tokens | reports |" in table
    assert f"| student before | {cells} | - | - | - | - |" in table and f"| opd | {cells} | 100 | 3 | 0 | - |" in table
    assert plotted_metric(measured) == metric
    plot(runs, metric, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def _yaml(tiny_config, tmp_path, objective: dict) -> Path:
    tiny_config["objective"] = objective
    tiny_config["optim"] = {"steps": 1, "learning_rate": 1e-3}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    return path


def test_sweep_without_matplotlib_warns_before_the_runs_and_runs_each_preset(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    path = _yaml(tiny_config, tmp_path, {"method": "opd", "support": "sampled"})
    console = _console()
    run_sweep(str(path), ["gkd"], [0], [], str(tmp_path / "s"), console)
    text = console.export_text()
    warning = text.index("matplotlib is not installed")
    assert "no run reports" in text[warning:] and "pip install 'opdkit[plot]'" in text[warning:]
    assert warning < text.index("gkd seed 0")
    assert "gkd: its preset sets objective.support (full), replacing the config's sampled" in text
    assert "| gkd |" in (tmp_path / "s" / "sweep.md").read_text()
    assert (tmp_path / "s" / "sweep.json").is_file() and not (tmp_path / "s" / "sweep.png").exists()
    assert not list((tmp_path / "s").rglob("report.html"))  # no page, and no link to one: the cell says "-"
    row = next(line for line in (tmp_path / "s" / "sweep.md").read_text().splitlines() if line.startswith("| gkd |"))
    assert row.endswith("| - |")
    ran = yaml.safe_load((tmp_path / "s" / "gkd" / "seed0" / "config.yaml").read_text())
    assert ran["objective"]["method"] == "gkd" and ran["objective"]["support"] == "full"


def test_presets_replace_the_configs_objective_keys_and_overrides_win(tiny_config, tmp_path):
    objective = {"method": "opd", "support": "sampled", "divergence": "reverse_kl", "beta": 0.3,
                 "aggregation": "sequence_mean"}
    tree = yaml.safe_load(_yaml(tiny_config, tmp_path, objective).read_text())
    console = _console()
    configs = sweep_configs(tree, ["gkd", "opd"], [0, 1], ["objective.lmbda=1.0", "optim.steps=2"], tmp_path / "s",
                            console)
    text = console.export_text()
    for gkd in configs["gkd"]:
        assert (gkd.objective.method, gkd.objective.support, gkd.objective.divergence) == ("gkd", "full", "jsd")
        assert gkd.objective.beta == 0.5 and gkd.objective.lmbda == 1.0  # the preset's beta; the override's lmbda
        assert gkd.objective.aggregation == "sequence_mean" and gkd.optim.steps == 2  # not in gkd's preset
    assert [c.seed for c in configs["gkd"]] == [0, 1]
    assert configs["gkd"][1].output_dir == str(tmp_path / "s" / "gkd" / "seed1")
    assert configs["opd"][0].objective.beta == 0.3 and configs["opd"][0].objective.aggregation == "sequence_mean"
    assert "gkd: its preset sets objective.support (full), replacing the config's sampled" in text
    assert "gkd: its preset sets objective.divergence (jsd), replacing the config's reverse_kl" in text
    assert "gkd: its preset sets objective.beta (0.5), replacing the config's 0.3" in text
    assert "gkd: --set objective.lmbda=1.0 overrides its preset's 0.5" in text
    assert "aggregation" not in text and "opd: " not in text  # opd's preset agrees with the config
    assert tree["objective"] == objective  # the YAML's tree is left as read


def test_a_preset_replaces_nested_keys_only(tiny_config, tmp_path):
    objective = {"method": "gae_opd", "credit": {"gamma": 1.0, "lam": 0.95, "value": "analytic"}}
    tree = yaml.safe_load(_yaml(tiny_config, tmp_path, objective).read_text())
    console = _console()
    credit = sweep_configs(tree, ["opd"], [0], [], tmp_path / "s", console)["opd"][0].objective.credit
    assert (credit.gamma, credit.lam, credit.value) == (0.0, 0.95, "analytic")
    replaced = "opd: its preset sets objective.credit.gamma (0.0), replacing the config's 1.0"
    assert console.export_text().strip() == replaced


@pytest.mark.parametrize("margin, said, noise, beat", [
    (0.0195, "was above it by 1.9 points", "within", False),
    (0.0199, "was above it by 2.0 points", "within", False),  # printed +2.0 "not beaten" before
    (0.03, "was above it by 3.0 points", "within", False),  # more than 2 points, less than the noise
    (0.0, "was level with it", "within", False),
    (-0.05, "was below it by 5.0 points", "more than", False),
    (0.08, "was above it by 8.0 points", "more than", True),
])
def test_demo_verdict_states_the_margin_it_prints(margin, said, noise, beat):
    baseline = 0.9
    sentence, resolved = verdict("GKD on-policy", baseline + margin, baseline, 512)
    headline = "beat" if beat else "did not beat"
    assert sentence.startswith(f"On-policy distillation {headline} the SeqKD baseline at the same budget: ")
    assert f"the best on-policy run (GKD on-policy) {said}, {noise} the noise" in sentence
    assert resolved is beat
    two_se = 200 * ((baseline + margin) * (0.1 - margin) / 512 + baseline * 0.1 / 512) ** 0.5
    assert f"two standard errors: {two_se:.1f} points" in sentence


def test_machine_description_names_processor_threads_and_precision():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        described = machine_description(torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert described.endswith(", 1 torch threads, float32")
    assert machine_description(torch.bfloat16).endswith(f", {threads} torch threads, bf16 autocast")
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    if names and not torch.cuda.is_available():
        assert described.startswith(names[0])


def test_demo_prints_the_machine_under_its_table_and_a_consistent_verdict(tmp_path, monkeypatch):
    import opdkit.demo

    def result(accuracy: float) -> dict:
        return {"before": {"accuracy": 0.25, "reverse_kl": 2.0}, "teacher": {"accuracy": 1.0},
                "after": {"accuracy": accuracy, "reverse_kl": 0.5}, "wall_s": 1.0}

    accuracy = {"opd": 0.625, "gkd": 0.828, "seqkd": 0.854}  # the figures of a float32 AMD EPYC
    monkeypatch.setattr(opdkit.demo, "setup", lambda config: config)
    monkeypatch.setattr(opdkit.demo, "train", lambda config, console: result(accuracy[config.objective.method]))
    console = _console()
    run_demo([], str(tmp_path / "demo"), console)
    text = console.export_text()
    described = machine_description(resolve_precision("auto", pick_device()))  # the shipped config's precision
    machine = text.index(f"These figures come from {described}. Every processor starts from the same")
    assert text.index("student after SeqKD baseline") < machine < text.index("OPD: classic on-policy distillation")
    assert ("On-policy distillation did not beat the SeqKD baseline at the same budget: the best on-policy run "
            "(GKD on-policy) was below it by 2.6 points") in text
    assert "within the noise that 512 held-out problems can resolve" in text
    assert "SFT on the teacher's clean samples is as strong a signal as any" in text
