"""Bad input fails before training with an error that names the fix."""

import json

import pytest

from opdkit.config import load_config
from opdkit.errors import OPDError
from opdkit.scenarios.arith import build_tokenizer
from opdkit.train import setup

from conftest import tiny_model


def run_setup(config: dict):
    return setup(load_config(base=config))


def test_a_valid_setup_loads(tiny_config):
    run = run_setup(tiny_config)
    assert run.method.name == "opd" and len(run.evaluator.examples) == 16


def test_missing_model_path(tiny_config, tmp_path):
    tiny_config["teacher"]["path"] = str(tmp_path / "nowhere")
    with pytest.raises(OPDError, match="model folder .* not found"):
        run_setup(tiny_config)


def test_tokenizer_vocabularies_are_compared_not_names(tiny_config, tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["x"])  # same name and class, one more token
    model = tiny_model(tokenizer, 0)
    model.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    tiny_config["teacher"]["path"] = str(tmp_path / "other")
    with pytest.raises(OPDError, match=r"tokenizers differ.*only in teacher \['x'\]"):
        run_setup(tiny_config)


def test_chat_template_mismatch(tiny_config, tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = tokenizer.chat_template.replace("<|assistant|>{{ message", "<|assistant|> {{ message")
    tiny_model(tokenizer, 0).save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    tiny_config["teacher"]["path"] = str(tmp_path / "other")
    with pytest.raises(OPDError, match="chat templates render the same conversation differently"):
        run_setup(tiny_config)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("rows, message", [
    ([{"question": "1+1", "answer": "2"}], r"no usable prompt field.*found fields \['answer', 'question'\]"),
    ([{"prompt": "1+1"}, {"prompt": "   "}], r"record 2: empty prompt"),
    ([{"messages": [{"role": "assistant", "content": "2"}]}], r"record 1: empty prompt"),
    (["{not json"], r":1: not valid JSON"),
    ([], r"is empty"),
    ([{"prompt": "1" * 60}], r"record 1: prompt of 62 tokens \+ max_completion_length 12 exceeds the model context of 64"),
])
def test_bad_datasets(tiny_config, tmp_path, rows, message):
    tiny_config["data"]["train"] = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(OPDError, match=message):
        run_setup(tiny_config)


def test_missing_dataset(tiny_config, tmp_path):
    tiny_config["data"]["train"] = str(tmp_path / "none.jsonl")
    with pytest.raises(OPDError, match="dataset .* not found"):
        run_setup(tiny_config)


def test_gkd_off_policy_batches_need_completions(tiny_config, tmp_path):
    tiny_config["data"]["train"] = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "12+34"}])
    tiny_config["objective"] = {"method": "gkd", "lmbda": 0.5}
    with pytest.raises(OPDError, match="add a 'completion' field .* or set lmbda: 1.0"):
        run_setup(tiny_config)


def test_messages_records_split_off_the_completion(tmp_path):
    from opdkit.data import load_examples

    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "1+2"},
                                                            {"role": "assistant", "content": "3"}], "answer": 3}])
    (example,) = load_examples(path)
    assert example.messages == [{"role": "user", "content": "1+2"}] and example.completion == "3" and example.answer == "3"


def test_unknown_builtin_names_the_closest():
    from opdkit.scenarios import resolve_builtin

    with pytest.raises(OPDError, match=r"did you mean 'arith'"):
        resolve_builtin("builtin:arth/teacher")
    with pytest.raises(OPDError, match=r"did you mean 'teacher'"):
        resolve_builtin("builtin:arith/teachr")


def test_a_scenario_cache_missing_any_part_is_built_again(tmp_path, monkeypatch):
    """A cache written before the scenario gained an artifact (smollm2's student-20) is rebuilt whichever part is
    asked for, so that `opd build`, which asks for the teacher, leaves the whole scenario in place."""
    from opdkit.scenarios import arith, resolve_builtin

    builds = []

    def fake_build(tmp, **options):
        builds.append(tmp)
        for artifact in arith.ARTIFACTS.values():
            (tmp / artifact).mkdir()

    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(arith, "build", fake_build)
    folder = tmp_path / arith.FOLDER
    (folder / arith.ARTIFACTS["teacher"]).mkdir(parents=True)  # an older cache: the teacher alone
    assert resolve_builtin("builtin:arith/teacher") == folder / arith.ARTIFACTS["teacher"] and len(builds) == 1
    assert all((folder / artifact).exists() for artifact in arith.ARTIFACTS.values())
    resolve_builtin("builtin:arith/student")  # complete now: nothing is built again
    assert len(builds) == 1


def test_hf_dataset_folder_loads_offline(tmp_path):
    datasets = pytest.importorskip("datasets")
    from opdkit.data import load_examples

    datasets.Dataset.from_list([{"prompt": "1+2", "answer": "3"}, {"prompt": "2+2", "answer": "4"}]).save_to_disk(tmp_path / "ds")
    examples = load_examples(f"hf:{tmp_path / 'ds'}")
    assert [e.messages[0]["content"] for e in examples] == ["1+2", "2+2"] and examples[1].answer == "4"
    with pytest.raises(OPDError, match="could not be loaded offline"):
        load_examples("hf:surely-not-a-cached-dataset-xyz:train")
