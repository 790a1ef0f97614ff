"""The typed config tree: YAML in, one validated pydantic object out.

Names follow TRL where users already know them (``beta``, ``lmbda``, ``temperature``,
``max_completion_length``). Unknown keys fail with the closest valid name; ``--set a.b=value``
overrides any leaf before validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import OPDError, closest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """A Hugging Face causal LM: a local folder, or ``builtin:<scenario>/<name>`` built on first use."""

    path: str


class TeacherSpec(ModelSpec):
    kind: Literal["local"] = "local"


class DataConfig(_Strict):
    """Prompt datasets: a JSONL file with a ``prompt`` or ``messages`` field (``completion`` and
    ``answer`` optional), ``builtin:<scenario>/<split>``, or ``hf:<name>[:<config>]:<split>`` for a
    ``datasets`` dataset available offline."""

    train: str
    eval: str | None = None
    task: str | None = Field(None, description="verifier name (see opdkit.tasks) or none")
    eval_size: int = Field(256, ge=1, description="held-out prompts used by eval")


class RolloutConfig(_Strict):
    """Student sampling. ``temperature``/``top_p`` shape the behaviour policy; the teacher is always
    scored at temperature 1 on the exact sampled ids."""

    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_completion_length: int = Field(32, ge=1)
    batch_size: int = Field(32, ge=1, description="prompts per micro-batch")


class ObjectiveConfig(_Strict):
    """Which objective, and its knobs.

    - ``opd``: classic OPD, advantage ``log pi_T(y_t) - log pi_S(y_t)`` on the sampled token, PG loss.
    - ``gkd``: generalized JSD(``beta``) over the full vocabulary (``top_k: null``) or the teacher's top-k,
      logits divided by ``temperature``; a fraction ``lmbda`` of batches on student samples, the rest on
      dataset completions.
    - ``seqkd``: supervised fine-tuning on teacher samples (sequence-level KD), the honest baseline.
    """

    method: Literal["opd", "gkd", "seqkd"] = "opd"
    beta: float = Field(0.5, ge=0, le=1)
    lmbda: float = Field(1.0, ge=0, le=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _method_knobs(self) -> "ObjectiveConfig":
        if self.method != "gkd" and self.lmbda != 1.0:
            raise ValueError(f"lmbda applies to method 'gkd' only; method {self.method!r} needs lmbda: 1.0")
        if self.method == "opd" and self.top_k is not None:
            raise ValueError("top_k applies to method 'gkd'; classic 'opd' uses the sampled token only")
        return self


class OptimConfig(_Strict):
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * learning_rate``."""

    steps: int = Field(100, ge=1, description="optimizer steps")
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)


class EvalConfig(_Strict):
    every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after)")
    batch_size: int = Field(128, ge=1)
    max_completion_length: int | None = Field(None, ge=1, description="default: rollout's")


class CheckpointConfig(_Strict):
    every: int = Field(0, ge=0, description="save every N steps (0: only at the end)")
    keep: int = Field(2, ge=1)


class Config(_Strict):
    seed: int = 0
    output_dir: str = "runs/opd"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast where the CPU has AMX or on CUDA; master weights stay fp32"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    student: ModelSpec
    teacher: TeacherSpec
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise OPDError(f"--set {dotted}: {key!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def _explain(error: ValidationError, source: str) -> OPDError:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            model: type[BaseModel] = Config
            for part in item["loc"][:-1]:
                field = model.model_fields.get(str(part))
                annotation = field.annotation if field else None
                model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else model
            name = str(item["loc"][-1])
            lines.append(f"  unknown key {where!r}{closest(name, model.model_fields)}")
        else:
            lines.append(f"  {where or '(top level)'}: {item['msg']}")
    return OPDError("\n".join(lines))


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read YAML (or start from ``base``), apply ``key=value`` overrides, validate."""
    tree: dict[str, Any] = dict(base or {})
    source = "(built in)"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise OPDError(f"config file {str(path)!r} not found: pass the path of a YAML file")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise OPDError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise OPDError(f"config file {str(path)!r} must hold a mapping of keys, not {type(tree).__name__}")
        source = str(path)
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
