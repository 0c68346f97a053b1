"""Where an MoE layer's expert weights live off the compute device: host memory, or one safetensors file per expert.

A store hands out one expert at a time as host tensors ``(w_in_DH, w_down_FD)``, the rows ``w_in_EDH[e]`` and
``w_down_EFD[e]`` of :class:`GroupedExperts`; an :class:`ExpertCache` copies them into its device slots.

On disk, a model's experts are a directory (see :func:`save_expert_stores`)::

    root/experts.json                        {"format": ..., "num_layers": L}
    root/layer-000/store.json                {"format": ..., "num_experts": E, "dim": D, "hidden_dim": F, ...}
    root/layer-000/expert-00000.safetensors  {"w_in_DH": [D, H], "w_down_FD": [F, D]}
    ...

so reading one expert opens one small file and loads only its two tensors.

Shape legend: E experts, D model dim, F expert hidden dim, H input-projection width (2F for SwiGLU, F for GELU),
L MoE layers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moe_lightning.experts.grouped import GroupedExperts
from moe_lightning.layer import MoELayer

STORE_FORMAT = "moe_lightning.expert_store/1"
ROOT_INDEX, LAYER_INDEX = "experts.json", "store.json"
W_IN, W_DOWN = "w_in_DH", "w_down_FD"


class ExpertStore:
    """Base class: ``num_experts`` experts of one layer, each ``(w_in_DH, w_down_FD)`` in ``dtype`` on the host.

    Subclasses implement :meth:`_read`; :meth:`get` checks the expert id first.
    """

    num_experts: int
    dim: int
    """D."""
    input_width: int
    """H: 2F for SwiGLU (gate and up side by side), F otherwise."""
    hidden_dim: int
    """F."""
    dtype: torch.dtype
    pinned: bool
    """Whether :meth:`get` returns page-locked tensors (what makes a ``non_blocking`` copy to CUDA asynchronous)."""

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert's two tensors: what one load moves to the device."""
        return (self.dim * self.input_width + self.hidden_dim * self.dim) * _itemsize(self.dtype)

    def get(self, expert: int) -> tuple[Tensor, Tensor]:
        """Expert ``expert``'s ``(w_in_DH, w_down_FD)`` on the host."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is outside [0, num_experts={self.num_experts})")
        return self._read(expert)

    def _read(self, expert: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _describe(self, w_in_EDH: Tensor, w_down_EFD: Tensor) -> None:
        self.num_experts, self.dim, self.input_width, self.hidden_dim, self.dtype = _expert_shape(w_in_EDH, w_down_EFD)

class HostExpertStore(ExpertStore):
    """All experts of a layer in CPU memory, page-locked when CUDA is available (``pin=None``).

    Args:
        w_in_EDH: input projections of every expert (copied to the CPU if elsewhere).
        w_down_EFD: output projections of every expert.
        pin: page-lock the host copy; ``None``: exactly when CUDA is available (pinning needs a CUDA driver).
    """

    def __init__(self, w_in_EDH: Tensor, w_down_EFD: Tensor, pin: bool | None = None) -> None:
        self._describe(w_in_EDH, w_down_EFD)
        self.pinned = _resolve_pin(pin)
        self.w_in_EDH = _host_copy(w_in_EDH, self.pinned)
        self.w_down_EFD = _host_copy(w_down_EFD, self.pinned)

    @classmethod
    def from_experts(cls, experts: GroupedExperts, pin: bool | None = None) -> HostExpertStore:
        """The weights of a :class:`GroupedExperts`, moved to the host."""
        return cls(experts.w_in_EDH, experts.w_down_EFD, pin)

    def _read(self, expert: int) -> tuple[Tensor, Tensor]:
        return self.w_in_EDH[expert], self.w_down_EFD[expert]


class DiskExpertStore(ExpertStore):
    """A directory of one safetensors file per expert, written by :meth:`write`; :meth:`get` reads one file.

    Args:
        directory: a directory :meth:`write` wrote.
        pin: page-lock each expert after reading it; ``None``: exactly when CUDA is available.
    """

    def __init__(self, directory: str | Path, pin: bool | None = None) -> None:
        self.directory = Path(directory)
        index = _read_index(self.directory / LAYER_INDEX)
        try:
            self.num_experts, self.dim = int(index["num_experts"]), int(index["dim"])
            self.input_width, self.hidden_dim = int(index["input_width"]), int(index["hidden_dim"])
            self.dtype = _dtype_from_name(index["dtype"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{self.directory / LAYER_INDEX} is not a valid expert store index: {error}") from None
        self.pinned = _resolve_pin(pin)

    @classmethod
    def write(
        cls, directory: str | Path, w_in_EDH: Tensor, w_down_EFD: Tensor, pin: bool | None = None
    ) -> DiskExpertStore:
        """Write every expert to ``directory`` (created if missing) and open it."""
        num_experts, dim, input_width, hidden_dim, dtype = _expert_shape(w_in_EDH, w_down_EFD)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for e in range(num_experts):
            tensors = {W_IN: w_in_EDH[e].detach().cpu().contiguous(), W_DOWN: w_down_EFD[e].detach().cpu().contiguous()}
            save_file(tensors, str(directory / _expert_file(e)))
        index = {
            "format": STORE_FORMAT, "num_experts": num_experts, "dim": dim, "input_width": input_width,
            "hidden_dim": hidden_dim, "dtype": str(dtype),
        }
        (directory / LAYER_INDEX).write_text(json.dumps(index, indent=1))
        return cls(directory, pin)

    def _read(self, expert: int) -> tuple[Tensor, Tensor]:
        path = self.directory / _expert_file(expert)
        if not path.is_file():
            raise FileNotFoundError(f"expert {expert} of the store in {self.directory} has no file {path.name}")
        tensors = load_file(str(path))
        w_in_DH, w_down_FD = tensors.get(W_IN), tensors.get(W_DOWN)
        want = {W_IN: (self.dim, self.input_width), W_DOWN: (self.hidden_dim, self.dim)}
        for name, tensor in ((W_IN, w_in_DH), (W_DOWN, w_down_FD)):
            if tensor is None or tuple(tensor.shape) != want[name] or tensor.dtype != self.dtype:
                got = None if tensor is None else (tuple(tensor.shape), tensor.dtype)
                raise ValueError(f"{path}: {name} should be {want[name]} {self.dtype}, found {got}")
        if self.pinned:
            w_in_DH, w_down_FD = w_in_DH.pin_memory(), w_down_FD.pin_memory()
        return w_in_DH, w_down_FD


def save_expert_stores(model: nn.Module, root: str | Path, pin: bool | None = None) -> list[DiskExpertStore]:
    """Write the experts of every :class:`MoELayer` of ``model`` (model order) under ``root``; one store per layer.

    ``root`` must be missing, empty, or a directory this function wrote before (its layer directories are replaced).
    """
    layers = [module for module in model.modules() if isinstance(module, MoELayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no MoELayer: there are no experts to save")
    for i, layer in enumerate(layers):
        if not isinstance(layer.experts, GroupedExperts):
            raise TypeError(f"MoE layer {i} has {type(layer.experts).__name__} experts; saving needs GroupedExperts")
    root = Path(root)
    _prepare_root(root)
    stores = [
        DiskExpertStore.write(root / _layer_dir(i), layer.experts.w_in_EDH, layer.experts.w_down_EFD, pin)
        for i, layer in enumerate(layers)
    ]
    (root / ROOT_INDEX).write_text(json.dumps({"format": STORE_FORMAT, "num_layers": len(layers)}))
    return stores


def load_expert_stores(root: str | Path, pin: bool | None = None) -> list[DiskExpertStore]:
    """The stores :func:`save_expert_stores` wrote under ``root``, one per MoE layer in model order."""
    root = Path(root)
    index = _read_index(root / ROOT_INDEX)
    return [DiskExpertStore(root / _layer_dir(i), pin) for i in range(int(index["num_layers"]))]


def check_store_matches(store: ExpertStore, experts: GroupedExperts, name: str = "MoE layer") -> None:
    """Raise if ``store`` cannot stand in for ``experts`` (of ``name``): counts, sizes and dtype must agree."""
    want = (experts.num_experts, experts.dim, experts.w_in_EDH.shape[-1], experts.hidden_dim, experts.w_in_EDH.dtype)
    got = (store.num_experts, store.dim, store.input_width, store.hidden_dim, store.dtype)
    if want != got:
        raise ValueError(
            f"{name}: the expert store has (num_experts, dim, input_width, hidden_dim, dtype)={got}, the layer's "
            f"experts {want}"
        )


def _expert_shape(w_in_EDH: Tensor, w_down_EFD: Tensor) -> tuple[int, int, int, int, torch.dtype]:
    """``(E, D, H, F, dtype)`` of a layer's expert weights, refusing weights that do not fit together."""
    if w_in_EDH.dim() != 3 or w_down_EFD.dim() != 3 or w_in_EDH.shape[0] != w_down_EFD.shape[0] \
            or w_in_EDH.shape[1] != w_down_EFD.shape[2] or w_in_EDH.dtype != w_down_EFD.dtype:
        raise ValueError(
            f"expert weights must be w_in_EDH [E, D, H] and w_down_EFD [E, F, D] of one dtype, got shapes "
            f"{tuple(w_in_EDH.shape)} ({w_in_EDH.dtype}) and {tuple(w_down_EFD.shape)} ({w_down_EFD.dtype})"
        )
    num_experts, dim, input_width = w_in_EDH.shape
    return num_experts, dim, input_width, w_down_EFD.shape[1], w_in_EDH.dtype


def _prepare_root(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise ValueError(f"expert store root {root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not (root / ROOT_INDEX).is_file():
            raise ValueError(
                f"expert store root {root} is a non-empty directory without {ROOT_INDEX}: refusing to write into it"
            )
        _read_index(root / ROOT_INDEX)
        for child in root.glob("layer-*"):
            if child.is_dir() and (child / LAYER_INDEX).is_file():
                shutil.rmtree(child)
    root.mkdir(parents=True, exist_ok=True)


def _read_index(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no expert store index at {path}")
    index = json.loads(path.read_text())
    if not isinstance(index, dict) or index.get("format") != STORE_FORMAT:
        got = index.get("format") if isinstance(index, dict) else index
        raise ValueError(f"{path} is not an expert store index: format={got!r}, expected {STORE_FORMAT!r}")
    return index


def _expert_file(expert: int) -> str:
    return f"expert-{expert:05d}.safetensors"


def _layer_dir(layer: int) -> str:
    return f"layer-{layer:03d}"


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _resolve_pin(pin: bool | None) -> bool:
    return torch.cuda.is_available() if pin is None else bool(pin)


def _host_copy(weight: Tensor, pin: bool) -> Tensor:
    host = weight.detach().to("cpu").contiguous()
    return host.pin_memory() if pin else host

