"""The probe of a teacher server before training, against our server set up to behave like others: capping the
top-k (vLLM's --max-logprobs), tempering prompt log-probs (vLLM's processed_logprobs), listing log-probs one
position early (llama-cpp-python with a prompt that lacks the BOS), rendering another chat template. Each
finding must be reported, and what the objective cannot use refused with the fix. llama.cpp: test_llamacpp.py."""

import contextlib
import copy
import json
from pathlib import Path

import pytest
from rich.console import Console

from opdkit.config import ServerTeacherSpec, load_config
from opdkit.errors import OPDError
from opdkit.models import load_model, load_tokenizer
from opdkit.serve import create_app, serve_in_thread
from opdkit.teachers.probe import _alignment, _counted
from opdkit.teachers.server import ServerTeacher
from opdkit.train import setup, train


@pytest.fixture(scope="module")
def teacher_files(tiny):
    return load_model(str(tiny / "teacher")), load_tokenizer(str(tiny / "teacher"))


@contextlib.contextmanager
def teacher_on(teacher_files, top_k="auto", served_tokenizer=None, **server):
    """A ServerTeacher reaching our server (started with ``server``'s settings) on 127.0.0.1."""
    model, tokenizer = teacher_files
    with serve_in_thread(create_app(model, served_tokenizer or tokenizer, "t", **server)) as url:
        spec = ServerTeacherSpec(kind="server", base_url=url, model="t", top_k=top_k, timeout_s=10, max_retries=1,
                                 backoff_s=0.01)
        teacher = ServerTeacher(spec, tokenizer)
        try:
            yield teacher
        finally:
            teacher.client.close()


def refusal(teacher, **probe) -> str:
    with pytest.raises(OPDError) as raised:
        teacher.probe(**probe)
    return str(raised.value)


def test_a_clean_server_passes_with_every_finding_ok(teacher_files):
    with teacher_on(teacher_files) as teacher:
        found = teacher.probe(top_k_needed=5)
    assert (found.models, found.owned_by, found.max_model_len, found.prompt_as) == (["t"], "opdkit", 64, "ids")
    assert found.max_top_k == found.asked_top_k == 20 and not found.capped and teacher.top_k == 20
    assert found.prompt_logprobs == "prompt_logprobs" and found.aligned and found.shift == 0
    assert found.temperature_applied_to_prompt is False and found.chat_template_matches is True
    lines = found.lines()
    assert len(lines) == 6 and "WRONG" not in "\n".join(lines)
    assert lines[3].startswith("alignment: OK") and lines[5].startswith("chat template: OK")
    assert json.loads(json.dumps(found.as_dict()))["findings"] == lines


def test_a_capped_top_k_is_measured_then_chosen_or_refused_with_the_fix(teacher_files):
    with teacher_on(teacher_files, max_logprobs=3) as teacher:
        found = teacher.probe()  # a sampled-token objective: auto takes what the server gives
        assert (found.max_top_k, found.refused_top_k, found.capped, teacher.top_k) == (3, 4, True, 3)
        assert "top-k: at most 3 log-probs per position (refused 4)" in found.lines()
        message = refusal(teacher, top_k_needed=5)
    assert "reads the teacher's top 5 log-probs per position but the server returns at most 3" in message
    assert "lower the objective's top_k" in message and "--max-logprobs" in message
    assert "top-k: at most 3" in message  # the findings come with the refusal
    with teacher_on(teacher_files, top_k=5, max_logprobs=3) as teacher:
        assert "teacher.top_k is 5 but the server returns at most 3" in refusal(teacher)


def test_a_server_that_tempers_prompt_logprobs_is_refused(teacher_files):
    with teacher_on(teacher_files, logprobs_mode="processed") as teacher:
        message = refusal(teacher)
    assert "temperature: WRONG, prompt log-probs at temperature 0.5 differ from those at 1" in message
    assert "passes prompt log-probs through its sampler" in message and "--logprobs-mode raw_logprobs" in message


def test_log_probs_listed_one_position_early_are_refused(teacher_files):
    with teacher_on(teacher_files, shift_prompt_logprobs=1) as teacher:
        message = refusal(teacher)
    assert "alignment: WRONG" in message
    assert "lists each position's log-probs 1 position early" in message and "BOS" in message
    assert "temperature: prompt log-probs do not depend" in message  # the other findings are still reported


def test_another_chat_template_is_refused_unless_prompts_are_raw(teacher_files):
    other = copy.deepcopy(teacher_files[1])
    other.chat_template = "{% for message in messages %}<|user|><|user|>{{ message['content'] }}{% endfor %}" \
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    with teacher_on(teacher_files, served_tokenizer=other) as teacher:
        message = refusal(teacher)
        assert "chat template: WRONG, its /tokenize renders a chat message as '<|user|><|user|>" in message
        assert "data.chat_template: false" in message and "serve the model whose chat template" in message
        found = teacher.probe(chat_template=False)
    assert found.chat_template_matches is None and "not compared" in found.lines()[5]


def test_a_silent_cap_is_counted_without_the_sent_token_the_server_adds():
    assert _counted({"1": -1.0, "2": -2.0, "3": -3.0, "9": -7.0}, "9") == 3  # the sent token, added below a top-3
    assert _counted({"1": -1.0, "2": -2.0, "9": -1.5}, "9") == 3  # the sent token within the top-3
    assert _counted({"1": -1.0, "2": -2.0, "9": -2.5}, "9") == 2  # third, or added: counted low, never high


def test_log_probs_listed_one_position_late_are_found():
    """Position ``j`` lists the distribution of position ``j - 1``: the first difference comes one after ``m + 1``."""
    base, variant = [0, 1, 2, 3, 4, 5], [0, 1, 2, 7, 4, 5]  # changed at m = 3

    def listed(ids):  # a causal model: position j's distribution depends on ids[:j]; listed one late
        dist = [{"a": -float(sum(ids[:j])), "b": -1.0} for j in range(len(ids))]
        return [(dist[j - 1], str(ids[j])) for j in range(1, len(ids))]

    aligned, shift, how = _alignment([base, variant, variant], [listed(base), listed(variant), listed(variant)])
    assert (aligned, shift) == (False, -1) and "from position 5 on" in how


def test_the_run_log_and_the_run_folder_keep_the_findings(teacher_files, tiny_config):
    model, tokenizer = teacher_files
    with serve_in_thread(create_app(model, tokenizer, "t")) as url:
        tiny_config["teacher"] = {"kind": "server", "base_url": url, "model": "t"}
        tiny_config["objective"] = {"method": "gkd", "support": "teacher_topk", "top_k": 4, "lmbda": 1.0}
        tiny_config["optim"]["steps"] = 1
        tiny_config["data"]["eval_size"] = 4
        console = Console(record=True, width=250)
        train(setup(load_config(base=tiny_config)), console)
    shown = console.export_text()
    banner = shown[shown.index("teacher"):shown.index("precision")]
    for finding in ("identity: serves t", "top-k: 20", "prompt log-probs: come back", "alignment: OK", "temperature:",
                    "chat template: OK"):
        assert finding in banner, shown
    saved = json.loads((Path(tiny_config["output_dir"]) / "teacher_probe.json").read_text())
    assert saved["aligned"] and saved["max_top_k"] == 20 and len(saved["findings"]) == 6
