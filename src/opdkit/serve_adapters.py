"""LoRA adapters loaded at runtime into a served model (``opd serve-teacher``'s ``/v1/load_lora_adapter``).

vLLM's behaviour, which clients rely on: adapters are named; loading a name already loaded is refused unless
``load_inplace`` (then its weights are replaced); unloading an unknown name is a 404; a request naming an adapter
is served with it, one naming the base model with the base weights. peft is imported on the first load only. The
server's one worker thread calls every method here, so a swap never happens during a forward pass.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch


class AdapterError(Exception):
    """A load or unload the server refuses: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Adapters:
    """The served model and the adapters loaded into it. The first load wraps the model with peft (in place);
    ``use(name)`` gives the model to run with adapter ``name``, or with none (the base weights)."""

    def __init__(self, model):
        self.model = model
        self.peft = None  # the peft wrapper, from the first load on
        self.paths: dict[str, str] = {}  # name -> the folder it was loaded from

    def names(self) -> list[str]:
        return list(self.paths)

    def load(self, name: str, path: str, inplace: bool = False) -> None:
        if name in self.names() and not inplace:
            raise AdapterError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the "
                                    "adapter in place, set 'load_inplace' to True.")
        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise AdapterError(400, f"lora_path {path!r} holds no adapter_config.json: give a folder that peft's "
                                    "save_pretrained wrote, readable by the server")
        from peft import PeftModel

        if name in self.names():
            self.unload(name)
        try:
            with torch.random.fork_rng():  # peft initialises new layers at random first: unseeded draws stay the same
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name).eval()
                else:
                    self.peft.load_adapter(str(folder), adapter_name=name)
        except Exception as exc:  # a damaged file, or an adapter for another base model
            raise AdapterError(400, f"could not load the adapter in {path!r} onto the served model: "
                                    f"{type(exc).__name__}: {str(exc)[:300]}") from None
        self.peft.requires_grad_(False)
        self.paths[name] = path

    def unload(self, name: str) -> None:
        if name not in self.names():
            raise AdapterError(404, f"The lora adapter '{name}' cannot be found.")
        with warnings.catch_warnings():  # peft warns that another adapter becomes active: none is, until a request
            warnings.simplefilter("ignore")
            self.peft.delete_adapter(name)
        del self.paths[name]

    @contextlib.contextmanager
    def use(self, name: str | None):
        """The model that computes with adapter ``name`` alone, or (None) with the base weights."""
        if name is None:
            if not self.names():
                yield self.model
                return
            with self.peft.disable_adapter():
                yield self.peft
            return
        if name not in self.names():
            raise AdapterError(404, f"The lora adapter '{name}' cannot be found (it was unloaded).")
        self.peft.set_adapter(name)
        yield self.peft
