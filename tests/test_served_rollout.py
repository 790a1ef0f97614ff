"""``rollout.engine: server``: the student's rollouts drawn by ``opd serve-teacher`` serving the student, its LoRA
adapter kept in sync through ``/v1/load_lora_adapter``: the served draws equal the local engine's for the same
seeds, a synced adapter gives the trained student's log-probs, the endpoints behave as vLLM's, a run trains."""

import random

import httpx
import pytest
import torch
from rich.console import Console

from opdkit.config import LoraSpec, ServedStudentSpec, load_config
from opdkit.data import load_examples
from opdkit.errors import OPDError
from opdkit.lora import wrap
from opdkit.models import load_model, load_tokenizer
from opdkit.rollout import sample
from opdkit.serve import create_app, serve_in_thread
from opdkit.served_rollout import ServedStudent, read_draw
from opdkit.teachers.server import Malformed, TokenMap
from opdkit.train import collect, setup, train

pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
NAME = "tiny-student"


@pytest.fixture(scope="module")
def server(tiny):
    """A copy of the tiny student served as ``tiny-student``: (base URL, tokenizer)."""
    tokenizer = load_tokenizer(str(tiny / "student"))
    with serve_in_thread(create_app(load_model(str(tiny / "student")), tokenizer, NAME)) as url:
        yield url, tokenizer


def lora_student(tiny, seed: int = 0):
    """The tiny student under an adapter whose B is random (so that it differs from the base)."""
    student = wrap(load_model(str(tiny / "student")), LoraSpec(**LORA))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return student


def served_logprobs(url: str, model: str, ids: list[int]) -> torch.Tensor:
    """``[n - 1]`` log-probs of ``ids[1:]`` under the served ``model`` (a base name or an adapter's)."""
    body = {"model": model, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1,
            "return_tokens_as_token_ids": True}
    answer = httpx.post(url + "/completions", json=body, timeout=30).raise_for_status().json()
    return torch.tensor(answer["choices"][0]["logprobs"]["token_logprobs"][1:])


def local_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    return logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_served_draws_equal_the_local_engine_for_the_same_seeds(tiny, server, tmp_path):
    url, tokenizer = server
    student = lora_student(tiny)
    spec = ServedStudentSpec(base_url=url, model=NAME, adapter_name="draws")
    served = ServedStudent(spec, tokenizer, student, tmp_path / "adapter")
    examples = load_examples(str(tiny / "train.jsonl"))[:4]
    torch.manual_seed(7)
    rollouts = served.sample(examples, max_completion_length=12)
    torch.manual_seed(7)
    seeds = torch.randint(0, 2**31 - 1, (len(examples),)).tolist()  # the seed sent with each row
    assert rollouts.source == "student" and rollouts.completion_ids.shape[1] <= 12
    for row, (example, seed) in enumerate(zip(examples, seeds)):
        torch.manual_seed(seed)
        local = sample(student, tokenizer, [example], max_completion_length=12)
        width = int(local.completion_mask.sum())
        assert int(rollouts.completion_mask[row].sum()) == width
        assert rollouts.completion_ids[row, :width].tolist() == local.completion_ids[0, :width].tolist()
        assert bool(rollouts.truncated[row]) == bool(local.truncated[0])
        torch.testing.assert_close(rollouts.sampler_logprobs[row, :width], local.sampler_logprobs[0, :width],
                                   atol=1e-5, rtol=0)
        assert rollouts.prompt_ids[row][rollouts.prompt_mask[row].bool()].tolist() == local.prompt_ids[0].tolist()
    assert (rollouts.sampler_logprobs * (1 - rollouts.completion_mask)).abs().sum() == 0  # zero after the mask

    # with guidance prefixes: prefix + continuation in the completion, the prefix marked
    prefixes = [[5, 6], [], [7], [5]]
    torch.manual_seed(8)
    guided = served.sample(examples, max_completion_length=6, prefixes=prefixes)
    torch.manual_seed(8)
    seeds = torch.randint(0, 2**31 - 1, (len(examples),)).tolist()
    for row, (example, prefix, seed) in enumerate(zip(examples, prefixes, seeds)):
        torch.manual_seed(seed)
        local = sample(student, tokenizer, [example], max_completion_length=6, prefixes=[prefix])
        width = int(local.completion_mask.sum())
        assert guided.completion_ids[row, :width].tolist() == local.completion_ids[0, :width].tolist()
        assert guided.guidance_mask[row, :width].tolist() == local.guidance_mask[0, :width].tolist()
        torch.testing.assert_close(guided.sampler_logprobs[row, :width], local.sampler_logprobs[0, :width],
                                   atol=1e-5, rtol=0)


def test_a_synced_adapter_gives_the_updated_students_logprobs(tiny, server, tmp_path):
    url, tokenizer = server
    student = lora_student(tiny, seed=1)
    spec = ServedStudentSpec(base_url=url, model=NAME, adapter_name="synced")
    served = ServedStudent(spec, tokenizer, student, tmp_path / "adapter")
    ids = tokenizer("12+34=46")["input_ids"]
    base = served_logprobs(url, NAME, ids)
    torch.testing.assert_close(served_logprobs(url, "synced", ids), local_logprobs(student, ids), atol=1e-4, rtol=0)

    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1.0)
    logits = student(input_ids=torch.tensor([ids])).logits[0, :-1]
    torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).backward()
    optimizer.step()
    stale = served_logprobs(url, "synced", ids)
    assert (stale - local_logprobs(student, ids)).abs().max() > 1e-3  # the server still has the old adapter
    served.sync()
    updated = served_logprobs(url, "synced", ids)
    torch.testing.assert_close(updated, local_logprobs(student, ids), atol=1e-4, rtol=0)
    assert (updated - base).abs().max() > 1e-3
    torch.testing.assert_close(served_logprobs(url, NAME, ids), base)  # the base model is served unchanged
    assert len([p for p in (tmp_path / "adapter").iterdir()]) == 1  # earlier versions removed once replaced


def test_the_adapter_endpoints_behave_as_vllms(tiny, server, tmp_path):
    url, tokenizer = server
    folder = tmp_path / "adapter"
    lora_student(tiny).save_pretrained(folder)
    post = lambda path, body: httpx.post(url + path, json=body, timeout=30)  # noqa: E731

    loaded = post("/load_lora_adapter", {"lora_name": "endpoint", "lora_path": str(folder)})
    assert loaded.status_code == 200 and "endpoint" in loaded.text
    again = post("/load_lora_adapter", {"lora_name": "endpoint", "lora_path": str(folder)})
    assert again.status_code == 400 and "load_inplace" in again.json()["error"]["message"]
    inplace = {"lora_name": "endpoint", "lora_path": str(folder), "load_inplace": True}
    assert post("/load_lora_adapter", inplace).status_code == 200
    cards = {card["id"]: card for card in httpx.get(url + "/models").json()["data"]}
    assert cards["endpoint"]["parent"] == NAME and cards["endpoint"]["root"] == str(folder) and NAME in cards

    bad = post("/load_lora_adapter", {"lora_name": "other", "lora_path": str(tmp_path / "missing")})
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    assert post("/load_lora_adapter", {"lora_name": NAME, "lora_path": str(folder)}).status_code == 400
    assert post("/unload_lora_adapter", {"lora_name": "never-loaded"}).status_code == 404

    assert post("/unload_lora_adapter", {"lora_name": "endpoint"}).status_code == 200
    assert "endpoint" not in [card["id"] for card in httpx.get(url + "/models").json()["data"]]
    gone = post("/completions", {"model": "endpoint", "prompt": [1, 2], "max_tokens": 1})
    assert gone.status_code == 404


def test_a_server_without_the_model_or_the_adapter_endpoint_is_refused(tiny, server, tmp_path):
    url, tokenizer = server
    student = lora_student(tiny)
    with pytest.raises(OPDError, match=r"rollout.server.model 'other' is not served"):
        ServedStudent(ServedStudentSpec(base_url=url, model="other"), tokenizer, student, tmp_path)
    app = create_app(load_model(str(tiny / "student")), tokenizer, NAME)
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", "") != "/v1/load_lora_adapter"]
    with serve_in_thread(app) as bare:
        with pytest.raises(OPDError, match="no runtime LoRA loading.*VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
            ServedStudent(ServedStudentSpec(base_url=bare, model=NAME), tokenizer, student, tmp_path)


def server_run_config(tiny, tiny_config, url: str, adapter_name: str):
    return load_config(base={
        **tiny_config, "student": {"path": str(tiny / "student"), "lora": LORA},
        "data": {**tiny_config["data"], "eval_size": 4}, "optim": {"steps": 2, "learning_rate": 1e-2},
        "rollout": {"max_completion_length": 8, "batch_size": 4, "num_samples": 2, "engine": "server",
                    "server": {"base_url": url, "model": NAME, "adapter_name": adapter_name}}})


def test_a_run_with_the_server_engine_trains_the_served_student(tiny, tiny_config, server, tmp_path):
    url, tokenizer = server
    run = setup(server_run_config(tiny, tiny_config, url, "run"))
    start = {n: p.detach().clone() for n, p in run.student.named_parameters() if "lora_" in n}
    result = train(run, Console(quiet=True))
    assert result["steps"] == 2
    changed = [n for n, p in run.student.named_parameters() if "lora_" in n and not torch.equal(p, start[n])]
    assert changed  # the adapter trained on the served rollouts
    ids = tokenizer("12+34=46")["input_ids"]
    run.student.eval()
    torch.testing.assert_close(served_logprobs(url, "run", ids), local_logprobs(run.student, ids), atol=1e-4, rtol=0)
    assert len(list((tmp_path / "run" / "served-adapter").iterdir())) == 1


def test_a_malformed_answer_is_named(server):
    _, tokenizer = server
    tokens = TokenMap(tokenizer)
    answer = lambda texts, values: {"choices": [{"logprobs": {"tokens": texts, "token_logprobs": values}}]}  # noqa: E731
    assert read_draw(answer(["token_id:3", "token_id:1"], [-0.5, -1.0]), 4, tokens) == ([3, 1], [-0.5, -1.0])
    with pytest.raises(Malformed, match="equal length"):
        read_draw(answer(["token_id:3"], [-0.5, -1.0]), 4, tokens)
    with pytest.raises(Malformed, match="equal length"):
        read_draw({"choices": [{"text": "12", "logprobs": None}]}, 4, tokens)
    with pytest.raises(Malformed, match="3 tokens returned for max_tokens 2"):
        read_draw(answer(["token_id:3"] * 3, [-0.5] * 3), 2, tokens)
    with pytest.raises(Malformed, match="not finite"):
        read_draw(answer(["token_id:3"], [None]), 4, tokens)
    with pytest.raises(OPDError, match="name no student token id"):
        read_draw(answer([f"token_id:{len(tokenizer) + 5}"], [-0.5]), 4, tokens)


def test_the_first_rollout_follows_weights_restored_after_setup(tiny, tiny_config, server):
    """A resume restores the adapter after ``setup``: the first rollout is drawn by the restored student."""
    url, tokenizer = server
    run = setup(server_run_config(tiny, tiny_config, url, "restored"))
    restored = lora_student(tiny, seed=3)  # stands for the checkpoint's adapter
    run.student.load_state_dict(restored.state_dict())
    rollouts = collect(run, random.Random(0), 0)
    assert rollouts.group is not None and rollouts.completion_ids.shape[0] == 8  # batch_size * num_samples
    ids = tokenizer("12+34=46")["input_ids"]
    torch.testing.assert_close(served_logprobs(url, "restored", ids), local_logprobs(restored, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("rollout, student_lora, message", [
    ({"engine": "server"}, True, "rollout.engine: server needs rollout.server"),
    ({"server": {"base_url": "http://127.0.0.1:8000/v1", "model": "m"}}, True, "remove rollout.server"),
    ({"engine": "server", "server": {"base_url": "http://127.0.0.1:8000/v1", "model": "m"}}, False,
     "set student.lora, or rollout.engine: hf"),
    ({"engine": "server", "temperature": 0.7, "server": {"base_url": "http://127.0.0.1:8000/v1", "model": "m"}}, True,
     "only at temperature 1 and top_p 1"),
    ({"engine": "server", "top_p": 0.9, "server": {"base_url": "http://127.0.0.1:8000/v1", "model": "m"}}, True,
     "only at temperature 1 and top_p 1"),
    ({"engine": "server", "server": {"base_url": "http://127.0.0.1:8000/v1", "model": "m", "adapter_nam": "x"}}, True,
     "unknown key 'rollout.server.adapter_nam'"),
])
def test_the_server_engine_config_is_checked(rollout, student_lora, message):
    base = {"student": {"path": "s", **({"lora": LORA} if student_lora else {})}, "teacher": {"path": "t"},
            "data": {"train": "d.jsonl"}, "rollout": rollout}
    with pytest.raises(OPDError, match=message):
        load_config(base=base)
