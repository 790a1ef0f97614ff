"""Teacher signals scored once and read back: the store that ``opd score-teacher`` writes and
``data.teacher_signals`` reads.

Off-policy states (the dataset's completions with ``lmbda < 1``, or the teacher's own samples for ``seqkd``)
are the same every epoch, so their teacher signal is too: scoring them once and reading the result back
takes the teacher off the critical path of every such micro-batch. Student-sampled states still go to the
live teacher.

Format (a folder; every array is raw little-endian, read as a numpy memmap, flat over the tokens of all
examples in ``data.train`` order)::

    manifest.json           format, teacher identity, tokenizer hash, k, temperature, source, counts, dtypes
    offsets.i64             [N + 1]  example i owns tokens offsets[i]:offsets[i + 1]
    completion_ids.i32      [T]      the completion tokens that were scored (checked against every batch)
    token_logprobs.f32      [T]      log pi_T(y_t | s_t) at temperature 1
    topk_ids.i32            [T, k]   the teacher's k most likely ids, in topk order
    topk_logprobs.f32       [T, k]   their log-probs, normalised over the whole vocabulary
    entropy.f32             [T]      the teacher's full entropy (local teachers only)

A store whose manifest does not match the run (another teacher, tokenizer, dataset, completion budget, too
small a k, or a source the method never uses) is refused at setup, before any weights load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import Example, left_pad, render_prompt, right_pad
from ..errors import OPDError
from ..rollout import Rollouts
from . import Support, TeacherSignal, teacher_request

FORMAT = 1
ARRAYS = {"offsets": np.int64, "completion_ids": np.int32, "token_logprobs": np.float32, "topk_ids": np.int32,
          "topk_logprobs": np.float32, "entropy": np.float32}
SUFFIX = {np.int64: "i64", np.int32: "i32", np.float32: "f32"}


def array_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}.{SUFFIX[ARRAYS[name]]}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """The vocabulary, special tokens and chat template the run renders and tokenizes with: what decides the
    token ids the teacher scored."""
    state = {"vocab": sorted(tokenizer.get_vocab().items()), "template": tokenizer.chat_template,
             "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}}
    return _sha256(json.dumps(state).encode())


def data_hash(examples: list[Example]) -> str:
    """The content of the training records (prompts and completions), whatever form the file took."""
    return _sha256(json.dumps([[e.messages, e.completion] for e in examples], sort_keys=True).encode())


def _weights_fingerprint(folder: Path) -> str:
    """config.json and, per weight file, its name, size and first and last MiB: another checkpoint shows there
    (a fine-tune of the same shape changes the first tensors' bytes) without reading gigabytes."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(2**20))
            f.seek(max(0, size - 2**20))
            digest.update(f.read(2**20))
    return digest.hexdigest()


def teacher_identity(spec, amp_dtype: torch.dtype) -> dict:
    """Who scored, wherever its folder now lies: a local model by its weights' fingerprint, the dtypes it ran in and
    its own context (``teacher.prompt``); a server by the model name it serves and that context."""
    if spec.kind == "local":
        from ..models import resolve_model_path, weights_dtype

        dtype = weights_dtype(spec.dtype, amp_dtype)
        return {"kind": "local", "fingerprint": _weights_fingerprint(Path(resolve_model_path(spec.path))),
                "dtype": str(dtype).removeprefix("torch."), "autocast": str(amp_dtype).removeprefix("torch."),
                "prompt": None if spec.prompt is None else spec.prompt.model_dump()}  # its own context, if any
    if spec.kind == "server":
        return {"kind": "server", "model": spec.model,
                "prompt": None if spec.prompt is None else spec.prompt.model_dump()}
    why = ("its weights are the student's, and with ema they move during training" if spec.kind == "self"
           else "it gives no log-probs")
    raise OPDError(f"a {spec.kind} teacher's signals cannot be stored ({why}): opd score-teacher and "
                   "data.teacher_signals work with teacher.kind local or server")


def source_record(source: str, config) -> dict:
    """What produced the stored states; every key must match the run that reads them."""
    record = {"kind": source, "max_completion_length": config.rollout.max_completion_length}
    if source == "teacher":
        record.update(temperature=config.rollout.temperature, top_p=config.rollout.top_p)
    return record


def expected_manifest(config, tokenizer, examples: list[Example], amp_dtype: torch.dtype, source: str) -> dict:
    """The manifest fields a store must carry to serve this config: written by ``opd score-teacher``, checked by
    ``open_signals``."""
    return {"teacher": teacher_identity(config.teacher, amp_dtype), "tokenizer": tokenizer_hash(tokenizer),
            "data": data_hash(examples), "source": source_record(source, config)}


def state_sources(objective) -> set[str]:
    """The off-policy state sources an objective ever draws (``Method.state_source``), which a store may serve."""
    return ({"dataset"} if objective.lmbda < 1.0 else set()) | ({"teacher"} if objective.states == "teacher" else set())


def needed_top_k(config, method) -> tuple[int, bool]:
    """``(k, entropy)`` the loop will ask the teacher for (``teacher_request``): what a store must hold."""
    support, top_k, entropy = teacher_request(config, method)
    return (top_k or 0) if support == "topk" else 0, entropy


@dataclass
class SignalStore:
    """An opened store: its manifest and memmapped arrays."""

    folder: Path
    manifest: dict
    arrays: dict[str, np.ndarray]

    @classmethod
    def open(cls, folder: str | Path) -> "SignalStore":
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise OPDError(f"{folder} holds no teacher signals (no manifest.json): write them with "
                           "opd score-teacher CONFIG.yaml --out DIR, or fix data.teacher_signals")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT:
            raise OPDError(f"{folder} is in store format {manifest.get('format')!r}, this opdkit reads {FORMAT}: "
                           "re-run opd score-teacher")
        tokens, k = manifest["tokens"], manifest["k"]
        shapes = {"offsets": (manifest["examples"] + 1,), "topk_ids": (tokens, k), "topk_logprobs": (tokens, k)}
        arrays = {}
        for name, dtype in ARRAYS.items():
            path = array_path(folder, name)
            if name == "entropy" and not manifest["entropy"]:
                continue
            shape = shapes.get(name, (tokens,))
            if not path.is_file() or path.stat().st_size != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                raise OPDError(f"{path} is missing or not {shape} {np.dtype(dtype).name}: the store is incomplete, "
                               "re-run opd score-teacher")
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", shape=shape) if int(np.prod(shape)) else np.zeros(shape, dtype)
        return cls(folder, manifest, arrays)

    def check(self, expected: dict, k: int, entropy: bool) -> None:
        """Refuse a store that does not match the run: ``expected`` holds the manifest fields the run would write."""
        fix = f"re-run opd score-teacher for this config (--out {self.folder} --force), or point data.teacher_signals elsewhere"
        for key, value in expected.items():
            stored = self.manifest.get(key)
            if isinstance(value, dict) and isinstance(stored, dict):
                for sub, v in value.items():
                    if stored.get(sub) != v:
                        raise OPDError(f"the teacher signals in {self.folder} do not match this run: {key}.{sub} is "
                                       f"{stored.get(sub)!r} there and {v!r} here; {fix}")
            elif stored != value:
                raise OPDError(f"the teacher signals in {self.folder} do not match this run: {key} is {stored!r} there "
                               f"and {value!r} here; {fix}")
        if self.manifest["k"] < k:
            raise OPDError(f"the teacher signals in {self.folder} hold a top-{self.manifest['k']} and this run reads a "
                           f"top-{k} (objective top-k or diagnostics.top_k): re-score with opd score-teacher --top-k {k}, "
                           "or lower the objective's top_k or set diagnostics.top_k: 0")
        if entropy and not self.manifest["entropy"]:
            raise OPDError(f"the teacher signals in {self.folder} hold no teacher entropy, which this run reads: "
                           "re-score them with a local teacher, or set diagnostics.top_k: 0")

    def completion(self, index: int) -> list[int]:
        start, end = self.arrays["offsets"][index : index + 2]
        return self.arrays["completion_ids"][start:end].tolist()

    def signal(self, rollouts: Rollouts, top_k: int | None, entropy: bool) -> TeacherSignal:
        """The stored signal of each row of ``rollouts`` (zeros past each row's completion), after checking that the
        stored completion is the row's own."""
        rows, width = len(rollouts.examples), rollouts.completion_ids.shape[1]
        k = top_k or 0
        token = torch.zeros(rows, width)
        ids = torch.zeros(rows, width, k, dtype=torch.long)
        values = torch.zeros(rows, width, k)
        teacher_entropy = torch.zeros(rows, width)
        offsets, lengths = self.arrays["offsets"], rollouts.completion_mask.sum(dim=1).long().tolist()
        completion_ids = rollouts.completion_ids.tolist()
        for row, (example, n) in enumerate(zip(rollouts.examples, lengths)):
            start, end = (int(x) for x in offsets[example.index : example.index + 2])
            own = completion_ids[row][:n]
            if n != end - start or self.arrays["completion_ids"][start:end].tolist() != own:
                raise OPDError(f"record {example.index + 1} of {self.manifest['data_path']} has other completion "
                               f"tokens than those scored in {self.folder}: the store is stale, re-run opd score-teacher")
            token[row, :n] = torch.from_numpy(np.array(self.arrays["token_logprobs"][start:end]))
            if k:
                ids[row, :n] = torch.from_numpy(np.array(self.arrays["topk_ids"][start:end, :k])).long()
                values[row, :n] = torch.from_numpy(np.array(self.arrays["topk_logprobs"][start:end, :k]))
            if entropy:
                teacher_entropy[row, :n] = torch.from_numpy(np.array(self.arrays["entropy"][start:end]))
        device = rollouts.completion_ids.device
        return TeacherSignal(token.to(device), topk_ids=ids.to(device) if k else None,
                             topk_logprobs=values.to(device) if k else None,
                             entropy=teacher_entropy.to(device) if entropy else None)


class StoreWriter:
    """Appends scored batches to the arrays of a folder, then writes the manifest last (a folder without one is
    incomplete)."""

    def __init__(self, folder: Path, k: int, entropy: bool):
        self.folder, self.k, self.entropy = folder, k, entropy
        folder.mkdir(parents=True)
        names = [n for n in ARRAYS if n != "offsets" and (entropy or n != "entropy")]
        self.files = {n: array_path(folder, n).open("wb") for n in names}
        self.offsets = [0]

    def add(self, rollouts: Rollouts, signal: TeacherSignal) -> None:
        """Each row's completion tokens (through its end token) and their signal, appended in row order."""
        arrays = {"completion_ids": rollouts.completion_ids, "token_logprobs": signal.token_logprobs,
                  "topk_ids": signal.topk_ids, "topk_logprobs": signal.topk_logprobs, "entropy": signal.entropy}
        arrays = {name: arrays[name].detach().cpu().numpy().astype(ARRAYS[name]) for name in self.files}  # one copy
        for row, n in enumerate(rollouts.completion_mask.sum(dim=1).long().tolist()):
            for name, array in arrays.items():
                self.files[name].write(array[row, :n].tobytes())
            self.offsets.append(self.offsets[-1] + n)

    def close(self, manifest: dict) -> dict:
        for f in self.files.values():
            f.close()
        np.asarray(self.offsets, dtype=np.int64).tofile(array_path(self.folder, "offsets"))
        manifest = {"format": FORMAT, **manifest, "k": self.k, "temperature": 1.0, "entropy": self.entropy,
                    "examples": len(self.offsets) - 1, "tokens": self.offsets[-1],
                    "dtypes": {n: np.dtype(ARRAYS[n]).name for n in ARRAYS}}
        (self.folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest


class StoredTeacher:
    """A teacher whose signal on the store's source (dataset completions, or its own stored samples) is read from
    the store; everything else (student states, greedy answers, evaluation) goes to the live teacher, whose other
    attributes it forwards."""

    def __init__(self, live, store: SignalStore, tokenizer, device: torch.device):
        self.live, self.store, self.tokenizer, self.device = live, store, tokenizer, device
        self.source = store.manifest["source"]

    def __getattr__(self, name: str):
        return getattr(self.live, name)

    def score(self, rollouts: Rollouts, support: Support = "token", top_k: int | None = None,
              entropy: bool = False) -> TeacherSignal:
        if rollouts.source != self.source["kind"] or support == "full":
            return self.live.score(rollouts, support, top_k, entropy)
        return self.store.signal(rollouts, top_k if support == "topk" else None, entropy)

    def sample(self, examples: list[Example], max_completion_length: int, temperature: float = 1.0,
               top_p: float = 1.0) -> Rollouts:
        """The stored sample of each prompt when the store holds the teacher's samples at these settings."""
        stored = (self.source["kind"] == "teacher" and temperature == self.source["temperature"]
                  and (temperature == 0 or top_p == self.source["top_p"])  # greedy: top_p plays no part
                  and max_completion_length == self.source["max_completion_length"])
        if not stored:
            return self.live.sample(examples, max_completion_length, temperature, top_p)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = left_pad([render_prompt(self.tokenizer, e.messages) for e in examples], pad)
        completions = [self.store.completion(e.index) for e in examples]
        completion_ids, completion_mask = right_pad(completions, pad, max(1, max(map(len, completions))))
        truncated = torch.tensor([eos not in c for c in completions])
        device = self.device
        return Rollouts(prompt_ids.to(device), prompt_mask.to(device), completion_ids.to(device),
                        completion_mask.float().to(device), truncated, examples, "teacher")


def open_signals(config, method, tokenizer, examples: list[Example], amp_dtype: torch.dtype) -> SignalStore:
    """The store ``data.teacher_signals`` names, checked against the run before any weights load."""
    folder = config.data.teacher_signals
    if method.teacher_support == "full":
        raise OPDError("data.teacher_signals holds token and top-k log-probs, and this objective reads the teacher's "
                       "whole distribution (support full): use support teacher_topk, or remove data.teacher_signals")
    sources = state_sources(config.objective)
    if not sources:
        raise OPDError("data.teacher_signals is set, but this objective trains only on student samples, which the "
                       "teacher must score live: remove it, or train on dataset states (lmbda < 1) or teacher states")
    store = SignalStore.open(folder)
    kind = store.manifest["source"]["kind"]
    if kind not in sources:
        raise OPDError(f"the teacher signals in {folder} are on {kind} states, which this objective never draws "
                       f"(it draws {', '.join(sorted(sources))} and student states): re-run opd score-teacher "
                       f"--source {sorted(sources)[0]}")
    store.check(expected_manifest(config, tokenizer, examples, amp_dtype, kind), *needed_top_k(config, method))
    return store
