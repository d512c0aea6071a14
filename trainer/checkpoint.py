"""Checkpoints: `model.pt` (the encoder, loadable anywhere) and `state.pt` (to resume exactly).

Both hold only tensors and plain Python values, so they load with
`torch.load(weights_only=True)`; both are written to a temporary file and renamed.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from conf import ConfigError
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
    """Save an encoder with what is needed to rebuild it (arch config, projector layout, normalisation,
    dual BN)."""
    model_cfg = dict(model_cfg)
    spec = getattr(encoder, "projector_spec", None)
    if spec:
        model_cfg["projector"] = dict(spec)
    atomic_save({"encoder": encoder.state_dict(), "model_cfg": model_cfg, "stats": stats,
                 "dual_bn": has_dual_bn(encoder), "meta": dict(meta or {})}, path)


def load_model_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checked(key: str, value: str, ok: Callable[[Mapping[str, Any]], bool], what: str) -> dict[str, Any]:
    """The blob of a file named on a command line (`key=value`), or a ConfigError saying why not."""
    try:
        blob = load_model_file(value)
    except Exception as e:  # missing, not a torch file, or not ours
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"{key}={value!r} is invalid: cannot be loaded ({type(e).__name__}: {first})") from e
    if not isinstance(blob, dict) or not ok(blob):
        keys = ", ".join(sorted(blob)) if isinstance(blob, dict) else type(blob).__name__
        raise ConfigError(f"{key}={value!r} is invalid: not a {what} written by this system (keys: {keys})")
    return blob


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


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG stream of this process as tensors and plain ints (loads with weights_only=True).

    python: the 624-word Mersenne state + position (`random.getstate()` without the tuple
    wrapper); numpy: key, position and the cached Gaussian of the legacy global generator;
    torch CPU (+ every CUDA device); plus any named `torch.Generator` (e.g. the loader's
    colour-augmentation generator).
    """
    version, internal, gauss_next = random.getstate()
    _, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": None if gauss_next is None else float(gauss_next),
        "numpy": torch.from_numpy(key.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_gauss": (int(has_gauss), float(cached_gaussian)),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore what `rng_state` saved (after a `torch.load(..., weights_only=True)` round trip)."""
    torch.set_rng_state(state["torch"])
    python = state["python"]
    python = tuple(int(v) for v in (python.tolist() if isinstance(python, torch.Tensor) else python))
    random.setstate((3, python, state.get("python_gauss")))
    has_gauss, cached = state.get("numpy_gauss", (0, 0.0))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state.get("numpy_pos", 624)),
                         int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name in saved:
            gen.set_state(saved[name])
