"""Several processes, one per device: launched by ``accelerate launch`` (or ``torchrun``), the student wrapped by
torch's DDP or sharded by torch's FSDP2 (``fully_shard``), the engines accelerate itself drives.

The launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; ``Processes.start`` joins
the process group (NCCL on CUDA, gloo on CPU). Why not ``accelerate.Accelerator().prepare``: its FSDP2 path runs
only on accelerators, so a CPU machine (our CI) could never test the sharded run users get; ``fully_shard`` and
DDP run the same on both. Everything the loop needs of several processes is here, as calls on one object:

- ``share``: this process's contiguous share of a list (the global batch, drawn the same on every process);
- ``sum`` / ``gather`` / ``all_true``: the collectives the loop's numbers need (a global token count, metrics,
  whether every process stopped decoding);
- ``wrap``: the model the loss pass runs through (DDP's wrapper; FSDP2 shards the student in place);
- ``model_state`` / ``optimizer_state`` / ``load_state_dicts``: full (unsharded) model and optimizer states, so that
  a checkpoint of a sharded run holds the whole model as ``save_pretrained`` writes it, like any other.

One process is the default and needs none of this: ``Processes()`` answers every call locally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import OPDError

Strategy = Literal["single", "ddp", "fsdp"]


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: Strategy = "single"
    replicated: list = dataclasses.field(default_factory=list)  # trainable parameters FSDP leaves whole (the LM head)

    @classmethod
    def start(cls, strategy: str = "auto") -> "Processes":
        """This process's place among those the launcher started (``WORLD_SIZE``); one alone needs no group.
        ``strategy``: ``ddp``, ``fsdp`` or ``auto`` (FSDP when the launcher's accelerate config enables it)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if strategy == "auto":
            strategy = "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" else "ddp"
        if strategy == "fsdp" and os.environ.get("FSDP_VERSION", "2") != "2":
            raise OPDError("the accelerate config asks for FSDP version 1; opdkit shards with FSDP2: set "
                           "fsdp_version: 2 in the accelerate config (accelerate config, or the YAML file)")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(torch.distributed.get_rank(), world, local_rank, strategy)

    @property
    def main(self) -> bool:
        """The process that writes files and prints."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1

    def device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")

    def share(self, items: list) -> list:
        """This process's contiguous share of ``items`` (whose length the world size divides)."""
        size = len(items) // self.world
        return items[self.rank * size : (self.rank + 1) * size]

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over the processes, on every process (a key some process lacks counts 0 there)."""
        if not self.several:
            return values
        out: dict[str, float] = {}
        for part in self.gather({k: float(v) for k, v in values.items()}):
            for key, value in part.items():
                out[key] = out.get(key, 0.0) + value
        return out

    def gather(self, obj) -> list:
        """``[obj of process 0, obj of process 1, ...]`` on every process (picklable; tensors go through the CPU)."""
        if not self.several:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, _on_cpu(obj))
        return out

    def concat(self, items: list) -> list:
        """Every process's ``items``, one list in process order, on every process."""
        return items if not self.several else [item for part in self.gather(items) for item in part]

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process: decoding under FSDP stops only when every process's rows ended,
        since each forward of a sharded model is a collective all processes join."""
        if not self.several:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device())  # NCCL reduces CUDA tensors, gloo CPU ones
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
        return bool(tensor.item())

    def barrier(self) -> None:
        if self.several:
            torch.distributed.barrier()

    # ---- the student ----
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loss pass runs through: DDP's wrapper (``model`` itself stays the module every other
        pass uses, without collectives), or ``model`` sharded in place by FSDP2: each decoder layer, then the rest
        but the LM head, which stays whole on every process (``replicated``), since the chunked full-vocabulary
        loss applies it outside the model's forward."""
        if self.strategy == "ddp":
            device_ids = [self.local_rank] if torch.cuda.is_available() else None
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            layers = set(getattr(model, "_no_split_modules", None) or [])
            if not layers:
                raise OPDError(f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard by: "
                               "use distributed.strategy: ddp")
            for module in model.modules():
                if type(module).__name__ in layers:
                    fully_shard(module)
            head = model.get_output_embeddings()
            fully_shard(model, ignored_params={head.weight})
            self.replicated = [head.weight] if head.weight.requires_grad else []
        return model

    @staticmethod
    def no_sync(wrapped: torch.nn.Module, last: bool):
        """DDP reduces gradients once per optimizer step, at the last micro-batch's backward."""
        if not last and isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            return wrapped.no_sync()
        return contextlib.nullcontext()

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of parameters neither DDP nor FSDP reduces: ``params`` outside the wrapped student
        (a method's value head) and those FSDP left whole (``replicated``)."""
        if not self.several:
            return
        for param in params + self.replicated:
            if param.grad is not None:
                torch.distributed.all_reduce(param.grad)
                param.grad /= self.world

    def param_groups(self, params: list[torch.nn.Parameter]) -> list[dict]:
        """The optimizer's parameter groups: under FSDP the sharded parameters apart from the whole ones, since a
        fused optimizer step runs over one group's tensors at once and cannot mix the two kinds."""
        if self.strategy != "fsdp":
            return [{"params": params}]
        from torch.distributed.tensor import DTensor

        sharded = [p for p in params if isinstance(p, DTensor)]
        whole = [p for p in params if not isinstance(p, DTensor)]
        return [{"params": group} for group in (sharded, whole) if group]

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """The gradients' global norm, after scaling them down to ``max_norm`` where it is above (torch's
        ``clip_grad_norm_``; under FSDP the sharded gradients' norm is gathered and joined with the whole ones')."""
        if self.strategy != "fsdp":
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            # torch scales by min(1, max_norm / (norm + 1e-6)) always, to spare a device its synchronisation; by 1
            # it changes nothing, and on a CPU skipping it spares a pass over the gradients (10-20 ms a step for
            # the SmolLM2 student's 64M)
            if norm.device.type != "cpu" or bool(max_norm / (norm + 1e-6) < 1):
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
            return float(norm)
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        sharded = [g for g in grads if isinstance(g, DTensor)]
        whole = [g for g in grads if not isinstance(g, DTensor)]  # identical on every process
        squares = sum(float(torch.nn.utils.get_total_norm(part).full_tensor() if part is sharded
                            else torch.nn.utils.get_total_norm(part)) ** 2 for part in (sharded, whole) if part)
        norm = squares**0.5
        if norm > max_norm:
            for grad in grads:
                grad.mul_(max_norm / (norm + 1e-6))
        return norm

    def model_state(self, model: torch.nn.Module) -> dict | None:
        """A sharded student's full weights, gathered onto the CPU (a collective: every process calls it), for
        ``save_pretrained``; None for a whole student, which ``save_pretrained`` reads itself."""
        if self.strategy != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state for a checkpoint: under FSDP gathered in full onto the CPU and keyed by parameter
        name (a collective), otherwise its own ``state_dict`` (keyed by index)."""
        if self.strategy != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dicts(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                         optimizer_state: dict) -> None:
        """Put a checkpoint's full states into the (sharded or whole) model and its optimizer; every process reads
        the files itself."""
        if self.strategy != "fsdp":
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optimizer_state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True))

    def close(self) -> None:
        if self.several and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _on_cpu(obj):
    """``obj`` with every tensor inside (dataclasses, lists, tuples, dicts) moved to the CPU, for pickling."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _on_cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                           if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(item) for item in obj)
    if isinstance(obj, dict):
        return {key: _on_cpu(value) for key, value in obj.items()}
    return obj
