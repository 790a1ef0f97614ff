import torch

from opdkit.data import load_examples
from opdkit.models import load_model, load_tokenizer
from opdkit.rollout import _completion_mask, from_dataset, sample


def test_completion_mask_stops_after_the_first_end_token():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8]])
    mask, truncated = _completion_mask(ids, eos_id=1)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, True]


def test_sampler_logprobs_equal_the_students_so_the_ratio_is_one(tiny):
    model, tokenizer = load_model(str(tiny / "student")), load_tokenizer(str(tiny / "student"))
    examples = load_examples(str(tiny / "train.jsonl"))[:6]
    torch.manual_seed(0)
    rollouts = sample(model, tokenizer, examples, max_completion_length=10)
    logprobs = rollouts.completion_logits(model).log_softmax(-1)
    token = logprobs.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1) * rollouts.completion_mask
    assert torch.allclose(token, rollouts.sampler_logprobs, atol=1e-4)
    assert rollouts.prompt_ids.shape[0] == 6 and (rollouts.prompt_mask[:, -1] == 1).all()  # left padded


def test_dataset_completions_follow_the_chat_template(tiny):
    tokenizer = load_tokenizer(str(tiny / "student"))
    examples = load_examples(str(tiny / "train.jsonl"))[:3]
    rollouts = from_dataset(tokenizer, examples, max_completion_length=40)
    texts = rollouts.texts(tokenizer)
    assert texts == [e.completion for e in examples]
    assert not rollouts.truncated.any()
    assert (rollouts.completion_ids[rollouts.completion_mask.bool()] == tokenizer.eos_token_id).sum() == 3
