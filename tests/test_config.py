import pytest

from opdkit.config import load_config
from opdkit.errors import OPDError

BASE = {"student": {"path": "s"}, "teacher": {"path": "t"}, "data": {"train": "d.jsonl"}}


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    config = load_config(base=BASE, overrides=["optim.steps=7", "objective.method=gkd", "objective.lmbda=0.5",
                                               "rollout.max_completion_length=9"])
    assert config.optim.steps == 7 and config.objective.method == "gkd" and config.objective.lmbda == 0.5
    assert config.rollout.max_completion_length == 9 and config.rollout.temperature == 1.0


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    path = write(tmp_path, "student: {path: s}\nteacher: {path: t}\ndata: {train: d}\noptim: {learnig_rate: 0.1}\n")
    with pytest.raises(OPDError, match=r"unknown key 'optim.learnig_rate' \(did you mean 'learning_rate'\?\)"):
        load_config(path)
    with pytest.raises(OPDError, match=r"unknown key 'rollout.max_new_tokens'"):
        load_config(base=BASE, overrides=["rollout.max_new_tokens=3"])
    with pytest.raises(OPDError, match=r"did you mean 'temperature'"):
        load_config(base=BASE, overrides=["rollout.temprature=0.5"])


def test_bad_values_are_named():
    with pytest.raises(OPDError, match=r"objective.beta"):
        load_config(base=BASE, overrides=["objective.beta=1.5"])
    with pytest.raises(OPDError, match=r"optim.steps"):
        load_config(base=BASE, overrides=["optim.steps=0"])
    with pytest.raises(OPDError, match=r"lmbda < 1 mixes in dataset completions"):
        load_config(base=BASE, overrides=["objective.lmbda=0.5"])
    with pytest.raises(OPDError, match=r"unknown method 'opd_pluss' \(did you mean 'opd_plus'\?\)"):
        load_config(base=BASE, overrides=["objective.method=opd_pluss"])
    with pytest.raises(OPDError, match=r"needs top_k"):
        load_config(base=BASE, overrides=["objective.method=gkd", "objective.support=teacher_topk"])
    with pytest.raises(OPDError, match=r"student"):
        load_config(base={"teacher": {"path": "t"}, "data": {"train": "d"}})


def test_file_errors(tmp_path):
    with pytest.raises(OPDError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(OPDError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2"))
    with pytest.raises(OPDError, match="must hold a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(OPDError, match="key=value"):
        load_config(base=BASE, overrides=["optim.steps"])


def test_shipped_configs_validate():
    from importlib import resources

    shipped = sorted(p for p in (resources.files("opdkit") / "configs").iterdir() if p.name.endswith(".yaml"))
    assert {"arith-opd.yaml", "arith-chunk-opd.yaml", "branch-gae.yaml", "smollm2-compress.yaml",
            "smollm2-heal.yaml", "smollm2-heal-24.yaml"} <= {p.name for p in shipped}
    for path in shipped:
        load_config(str(path))


@pytest.mark.parametrize("overrides,message", [
    (["objective.estimator=k2"], r"k2 as a policy-gradient cost .* use estimator k1"),
    (["objective.estimator=k3"], r"k3 as a detached policy-gradient cost .* set correction: true"),
    (["objective.grad_path=direct", "objective.estimator=k1"], r"k1 backpropagated directly has zero expected gradient"),
    (["objective.grad_path=direct", "objective.estimator=k3"], r"k3 backpropagated directly trains forward_kl's gradient"),
    (["objective.temperature=2.0"], r"objective.temperature softens both distributions .*rollout.temperature sets"),
    (["objective.method=gkd", "objective.tail=true"], r"tail keeps the mass outside a top-k support"),
    (["objective.method=gkd", "objective.estimator=k3"], r"remove estimator"),
    (["objective.method=gkd", "objective.credit.gamma=1.0"], r"credit.gamma shape the policy-gradient advantage"),
    (["objective.credit.lam=0.9"], r"credit.lam is GAE's lambda and needs a value"),
    (["objective.method=seqkd", "objective.trust_region.enabled=true"], r"trust_region gates the policy-gradient"),
    (["objective.trust_region.outliers=mask"], r"trust_region.outliers set while trust_region.enabled is false"),
    (["objective.method=opd_plus", "objective.correction=false"], r"stop-gradient advantage .* set correction: true"),
    (["objective.method=seqkd", "objective.divergence=reverse_kl"], r"cross-entropy, whose gradient is forward KL's"),
    (["objective.credit.gamma=1.0", "rollout.temperature=0.7"], r"credit.gamma > 0 .* use credit.gamma: 0"),
    (["objective.ratio_clip=0.2"], r"objective.ratio_clip is no longer a key: PPO's clip acts on samples reused"),
])
def test_points_that_would_train_on_another_gradient_are_refused_with_the_fix(overrides, message):
    with pytest.raises(OPDError, match=message):
        load_config(base=BASE, overrides=overrides)


def test_estimators_default_to_the_form_that_names_the_divergence():
    assert load_config(base=BASE).objective.estimator == "k1"  # classic OPD
    assert load_config(base=BASE, overrides=["objective.grad_path=direct"]).objective.estimator == "k2"
    direct_fkl = ["objective.grad_path=direct", "objective.divergence=forward_kl"]
    assert load_config(base=BASE, overrides=direct_fkl).objective.estimator == "k3"
    assert load_config(base=BASE, overrides=["objective.method=opd_plus"]).objective.estimator is None  # phi
