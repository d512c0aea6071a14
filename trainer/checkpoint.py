"""Checkpoints: `model.pt` (the encoder, loadable anywhere) and `state.pt` (to resume exactly).

Both hold only tensors and plain Python values, so they load with
`torch.load(weights_only=True)`. Every file is written atomically (a temporary name, fsync, rename,
fsync of the folder) and a checkpoint folder ends with `manifest.json` (each file's size and
sha256, plus the epoch and config hash), written last: `verify_checkpoint` tells a complete folder
from a truncated, zero-filled or half-copied one, and `move_aside` keeps a damaged one for
inspection under another name (never deleting it). Both take the pyarrow file system the folder is
on (`fs`, None: local), so checkpoints in Ray's remote storage (s3://) are checked the same way.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping

import numpy as np
import torch

from conf import ConfigError
from trainer.models import Encoder, build_encoder
from trainer.models.dual_bn import has_dual_bn, single_bn_state_dict
from trainer.storage import (CHUNK, atomic_write, copy_file, exists, file_size, fs_path, fsync_dir, is_local,
                             list_dir, local_fs, move_dir, read_bytes)

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
MOVED_FILE = "MOVED_ASIDE.txt"  # left where a damaged folder was moved away from (see move_aside)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def copy_checkpoint_files(src: str | os.PathLike, dest: str | os.PathLike,
                          after_each: Callable[[], None] | None = None, src_fs: Any = None,
                          dest_fs: Any = None) -> None:
    """The files of checkpoint folder `src` into the folder `dest` (local: it must exist), each
    atomically, the manifest last (a copy cut short has no manifest, so it never verifies); hidden
    temporaries are skipped. `src_fs` / `dest_fs`: pyarrow file systems (None: local)."""
    names = [n for n, is_dir in list_dir(src_fs, src) if not is_dir and not n.startswith(".")]
    for name in sorted(names, key=lambda n: (n == MANIFEST_FILE, n)):
        copy_file(fs_path(src, src_fs) / name, fs_path(dest, dest_fs) / name, src_fs, dest_fs)
        if after_each is not None:
            after_each()


def file_digest(path: str | os.PathLike, fs: Any = None) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in 1 MiB chunks."""
    h, size = hashlib.sha256(), 0
    with (fs or local_fs()).open_input_stream(os.fspath(path)) as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def write_manifest(directory: str | os.PathLike, **meta: Any) -> dict[str, Any]:
    """Record size and sha256 of every file in the local `directory` (hidden temporaries excluded) in
    manifest.json, written last and atomically: a folder with a manifest was complete once."""
    d = Path(directory)
    files = {}
    for p in sorted(d.iterdir()):
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith("."):
            size, sha = file_digest(p)
            files[p.name] = {"size": size, "sha256": sha}
    manifest = {"version": 1, **meta, "files": files}
    atomic_write(d / MANIFEST_FILE, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return manifest


def read_manifest(directory: str | os.PathLike, fs: Any = None) -> dict[str, Any]:
    return json.loads(read_bytes(fs, fs_path(directory, fs) / MANIFEST_FILE))


def verify_checkpoint(directory: str | os.PathLike, legacy_ok: bool = False, fs: Any = None) -> str | None:
    """What is wrong with the checkpoint folder `directory` ("<file>: <what>"), or None if every file
    its manifest lists is there with the recorded size and sha256. `legacy_ok`: a folder without a
    manifest (written before manifests existed) passes if each of its .pt files loads. `fs`: the
    pyarrow file system it is on (None: local)."""
    d = fs_path(directory, fs)
    if exists(fs, d / MOVED_FILE):
        return f"{MOVED_FILE}: moved aside earlier ({read_bytes(fs, d / MOVED_FILE).decode().strip()})"
    if not exists(fs, d / MANIFEST_FILE):
        return _legacy_problem(d, fs) if legacy_ok else f"{MANIFEST_FILE}: missing"
    try:
        files = read_manifest(d, fs)["files"]
        expected = {str(name): (int(e["size"]), str(e["sha256"])) for name, e in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST_FILE}: unreadable ({type(e).__name__})"
    for name, (size, sha) in expected.items():
        actual = file_size(fs, d / name)
        if actual is None:
            return f"{name}: missing"
        if actual != size:
            return f"{name}: {actual} bytes, the manifest says {size} (truncated or partly written)"
        if file_digest(d / name, fs)[1] != sha:
            return f"{name}: sha256 differs from the manifest (overwritten or zero-filled)"
    return None


def _legacy_problem(d: PurePosixPath, fs: Any) -> str | None:
    for name in [n for n, is_dir in list_dir(fs, d) if not is_dir and n.endswith(".pt")]:
        try:
            torch.load(io.BytesIO(read_bytes(fs, d / name)), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, zero-filled, not a torch file
            first = (str(e).strip().splitlines() or [""])[0][:120]
            return f"{name}: cannot be loaded ({type(e).__name__}: {first})"
    return None


def damaged_name(path: str | os.PathLike, fs: Any = None) -> PurePosixPath:
    """`<name>.damaged-<n>` beside `path`, n the first number not taken."""
    path = fs_path(path, fs)
    n = 1
    while exists(fs, path.with_name(f"{path.name}.damaged-{n}")):
        n += 1
    return path.with_name(f"{path.name}.damaged-{n}")


def move_aside(path: str | os.PathLike, reason: str, placeholder: bool = False, fs: Any = None) -> PurePosixPath:
    """Move a damaged folder to `damaged_name(path)` (never delete it; in an object store: copy, then
    delete the original); returns the new path. `placeholder`: leave a folder with only MOVED_FILE at
    the old name, for a bookkeeper that still lists it (Ray's checkpoint manager refuses a snapshot
    naming a missing folder and fails deleting one)."""
    path = fs_path(path, fs)
    dest = damaged_name(path, fs)
    move_dir(fs, path, dest, last=MANIFEST_FILE)
    if placeholder:
        if is_local(fs):
            path.mkdir()
        atomic_write(path / MOVED_FILE, lambda f: f.write(f"to {dest.name}: {reason}\n".encode()), fs)
    if is_local(fs):
        fsync_dir(path.parent)
    return dest


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
