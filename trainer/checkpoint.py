"""Checkpoints: `model.pt` (the encoder, loadable anywhere) and `state.pt` (to resume exactly).

Both hold only tensors and plain Python values, so they load with
`torch.load(weights_only=True)`; both are written to a temporary file and renamed.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from trainer.models import Encoder, build_encoder
from trainer.models.dual_bn import has_dual_bn, single_bn_state_dict

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_model(path: str | os.PathLike, encoder: Encoder, model_cfg: Mapping[str, Any], stats: str,
               meta: Mapping[str, Any] | None = None) -> None:
    """Save an encoder with what is needed to rebuild it (arch config, normalisation, dual BN)."""
    atomic_save({"encoder": encoder.state_dict(), "model_cfg": dict(model_cfg), "stats": stats,
                 "dual_bn": has_dual_bn(encoder), "meta": dict(meta or {})}, path)


def load_model_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_encoder(path: str | os.PathLike, device: torch.device | str = "cpu", with_projector: bool = True,
                 bn_route: str = "pgd") -> Encoder:
    """Rebuild a single-BN encoder from `model.pt`; a dual-BN checkpoint gives its `bn_route` set."""
    blob = load_model_file(path)
    state = blob["encoder"]
    if blob.get("dual_bn"):
        state = single_bn_state_dict(state, bn_route)
    has_proj = any(k.startswith("projector.") for k in state)
    enc = build_encoder(blob["model_cfg"], blob["stats"], with_projector=with_projector and has_proj)
    if not (with_projector and has_proj):
        state = {k: v for k, v in state.items() if not k.startswith("projector.")}
    enc.load_state_dict(state)
    return enc.to(device)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()[1],
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
