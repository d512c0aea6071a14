"""Layer-wise representation analysis of one or two checkpoints (Ghofrani et al.): linear CKA and
per-layer linear probes, on clean and adversarial inputs. Runs in-process (one device), no Ray.

    python -m trainer.analyze_representations checkpoint=outputs/<run>/student/model.pt
    python -m trainer.analyze_representations checkpoint=<student>/model.pt checkpoint_b=<teacher>/model.pt
    python -m trainer.analyze_representations checkpoint=<run>/evaluate_student/classifier_slf.pt
    python -m trainer.analyze_representations checkpoint=... analysis.n_examples=256 analysis.pgd.steps=10 out=DIR

Arguments: checkpoint= (model A: a model.pt, a folder holding one, or a classifier_<protocol>.pt that
the evaluate stage wrote), checkpoint_b= (optional model B), classifier= / classifier_b= (the
classifier whose PGD examples are used: a classifier_<protocol>.pt of that model; default: a linear
head fitted on the model's clean pooled features of `n_probe_train` training images), out= (output
folder; default <output_dir>/analysis-<labels>-<hash>). Everything else is a Hydra override
(`analysis.*` from conf/analysis/default.yaml, `data=...`, `seed=...`).

Writes analysis.json and analysis.npz (every number), and PNGs: cka_<m>_within.png (layer x layer
heatmaps, clean and adversarial), cka_<m>_clean_vs_adv.png (heatmap + same-layer line),
cka_cross.png (model A x model B layers) and probes.png (probe accuracy per layer).
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from conf import ConfigError, compose
from conf.cli import CommandLine, cli_main
from trainer.attacks import pgd_config
from trainer.checkpoint import load_checked
from trainer.evaluation.robustness import clean_and_pgd_counts

OWN_KEYS = ("checkpoint", "checkpoint_b", "classifier", "classifier_b", "out")


# ----------------------------------------------------------------------------------------- loading
def load_images(data_cfg: Mapping[str, Any], split: str, n: int, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n images of `split` (no augmentation, in order) from its .beton, as CPU tensors."""
    from data_pipeline.loaders import build_loader
    from data_pipeline.write import beton_path, ensure_betons

    ensure_betons(data_cfg, [split], log=lambda m: print(m, flush=True))
    loader = build_loader(str(beton_path(data_cfg, split)), "eval", batch_size, "cpu", 1, train=False,
                          drop_last=False)
    xs, ys, have = [], [], 0
    for batch in loader:
        xs.append(batch["views"][0].contiguous())
        ys.append(batch["label"])
        have += len(ys[-1])
        if have >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _label_of(path: Path, blob: Mapping[str, Any]) -> str:
    meta = blob.get("meta") or {}
    if "classifier" in blob:
        return f"{blob.get('label') or path.parent.name}/{blob.get('protocol', 'clf')}"
    if meta.get("stage"):
        return str(meta["stage"])
    name = path.parent.name if path.name.endswith(".pt") else path.name
    return name or str(meta.get("method", "model"))


def _classifier_from_blob(blob: Mapping[str, Any], arch_blob: Mapping[str, Any] | None, path: Path):
    from trainer.evaluation.protocols import load_classifier

    if "model_cfg" not in blob and arch_blob is None:
        raise ValueError(f"{path} has no model_cfg (written before classifiers carried it); pass the encoder's "
                         "model.pt as checkpoint= and this file as classifier=")
    return load_classifier(blob, "cpu", arch_blob)


def load_model(checkpoint: str, classifier: str | None, device: torch.device):
    """(encoder, classifier or None, label, stats). With a classifier file, its (possibly fine-tuned)
    encoder is the one analysed, so that the attacked network and the analysed one are the same."""
    from trainer.checkpoint import MODEL_FILE, load_encoder

    path = Path(checkpoint)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"checkpoint {file} does not exist")
    blob = torch.load(file, map_location="cpu", weights_only=True)
    label = _label_of(file, blob)
    if "classifier" in blob:
        clf = _classifier_from_blob(blob, None, file).to(device)
        return clf.encoder, clf, label, blob.get("stats")
    encoder = load_encoder(file, device, with_projector=False).eval()
    if classifier:
        cpath = Path(classifier)
        cblob = torch.load(cpath, map_location="cpu", weights_only=True)
        if "classifier" not in cblob:
            raise ValueError(f"classifier={cpath} is not a classifier_<protocol>.pt written by the evaluate stage")
        clf = _classifier_from_blob(cblob, blob, cpath).to(device)
        return clf.encoder, clf, f"{label}/{cblob.get('protocol', 'clf')}", blob.get("stats")
    return encoder, None, label, blob.get("stats")


# ---------------------------------------------------------------------------------------- analysis
def analyse_model(encoder, classifier, data: Mapping[str, torch.Tensor], acfg: Mapping[str, Any],
                  num_classes: int, device: torch.device, log=print) -> tuple[dict[str, Any], dict[str, Any]]:
    """CKA (within, clean vs adversarial) and layer probes for one model.

    Returns (results as plain lists, features kept for the cross-model comparison)."""
    from trainer.evaluation.cka import cka_matrix, collect_layer_features, layer_names
    from trainer.evaluation.probes import ProbedClassifier, fit_linear_probe, layer_probes

    bs = int(acfg["batch_size"])
    attack = pgd_config(acfg["pgd"])
    x_te, y_te, x_tr, y_tr = data["x_test"], data["y_test"], data["x_train"], data["y_train"]
    res: dict[str, Any] = {}
    t0 = time.time()
    if classifier is None:
        # Attack a linear head fitted on the frozen encoder's clean pooled features (a quick SLF).
        feats = collect_layer_features(encoder, x_tr, "avg", bs, device)[-1].to(device)
        probe = fit_linear_probe(feats, y_tr.to(device), num_classes, float(acfg["probe_weight_decay"]),
                                 int(acfg["probe_max_iter"]))
        classifier = ProbedClassifier(encoder, probe).to(device).eval()
        res["attacked_classifier"] = "linear probe on clean pooled features (fitted here)"
    else:
        res["attacked_classifier"] = "given classifier"
    counts = clean_and_pgd_counts(classifier, _batches(x_te, y_te, bs, device), attack, keep_adversarial=True)
    x_adv = torch.cat(counts.adversarial)
    res["classifier_sa"], res["classifier_ra"] = counts.clean / counts.total, counts.robust / counts.total
    log(f"[analysis] attacked classifier: SA {res['classifier_sa']:.4f} RA(PGD-{attack.steps}) "
        f"{res['classifier_ra']:.4f} on {len(y_te)} images ({time.time() - t0:.0f}s)")

    clean = collect_layer_features(encoder, x_te, acfg["cka_pooling"], bs, device)
    adv = collect_layer_features(encoder, x_adv, acfg["cka_pooling"], bs, device)
    res["layers"] = layer_names(len(clean))
    res["feature_dims"] = [int(f.shape[1]) for f in clean]
    debiased = bool(acfg["debiased"])
    within = cka_matrix(clean, debiased=debiased)
    within_adv = cka_matrix(adv, debiased=debiased)
    cva = cka_matrix(clean, adv, debiased=debiased)
    res["cka_within_clean"] = within.tolist()
    res["cka_within_adv"] = within_adv.tolist()
    res["cka_clean_vs_adv"] = cva.tolist()
    res["cka_same_layer_clean_vs_adv"] = np.diag(cva).tolist()
    log("[analysis] CKA same layer clean vs adv: "
        + " ".join(f"{n}={v:.3f}" for n, v in zip(res["layers"], np.diag(cva))))

    if acfg["probes"]:
        t1 = time.time()
        pp = acfg["probe_pooling"]
        tr_f = collect_layer_features(encoder, x_tr, pp, bs, device)
        te_f = collect_layer_features(encoder, x_te, pp, bs, device) if pp != acfg["cka_pooling"] else clean
        te_adv_f = collect_layer_features(encoder, x_adv, pp, bs, device) if pp != acfg["cka_pooling"] else adv
        tr_adv_f = None
        if acfg["probe_adv_train"]:
            x_tr_adv = torch.cat(clean_and_pgd_counts(classifier, _batches(x_tr, y_tr, bs, device), attack,
                                                      keep_adversarial=True).adversarial)
            tr_adv_f = collect_layer_features(encoder, x_tr_adv, pp, bs, device)
        res["probes"] = layer_probes(tr_f, y_tr, te_f, y_te, num_classes, te_adv_f, tr_adv_f,
                                     float(acfg["probe_weight_decay"]), int(acfg["probe_max_iter"]))
        log(f"[analysis] probes ({time.time() - t1:.0f}s): " + "; ".join(
            f"{k} " + " ".join(f"{v:.2f}" for v in vals) for k, vals in res["probes"].items()))
    return res, {"clean": clean}


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device):
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        yield xb.to(device).contiguous(), yb.to(device)


def run_analysis(cfg: Mapping[str, Any], checkpoint: str, checkpoint_b: str | None = None,
                 classifier: str | None = None, classifier_b: str | None = None,
                 out: str | None = None, log=print, labels: tuple[str, str] | None = None) -> dict[str, Any]:
    """`labels`: names for models a and b in the figures and JSON (default: from the checkpoints)."""
    from trainer.evaluation.cka import cka_matrix

    acfg, data_cfg = cfg["analysis"], cfg["data"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(int(cfg["seed"]))
    models = [("a", checkpoint, classifier)] + ([("b", checkpoint_b, classifier_b)] if checkpoint_b else [])
    loaded = {}
    for tag, ck, clf in models:
        enc, c, label, stats = load_model(ck, clf, device)
        if labels:
            label = labels[0 if tag == "a" else 1]
        if stats and stats != data_cfg["stats"]:
            log(f"[analysis] warning: {ck} normalises with '{stats}' statistics but data is "
                f"'{data_cfg['name']}' (data.stats={data_cfg['stats']}): pass data=... to match")
        loaded[tag] = (enc, c, label, ck, clf)
    out_dir = Path(out) if out else default_out_dir(cfg, [v[2] for v in loaded.values()], models)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    x_te, y_te = load_images(data_cfg, acfg["split"], int(acfg["n_examples"]), int(acfg["batch_size"]))
    x_tr, y_tr = load_images(data_cfg, "train", int(acfg["n_probe_train"]), int(acfg["batch_size"]))
    data = {"x_test": x_te, "y_test": y_te, "x_train": x_tr, "y_train": y_tr}
    log(f"[analysis] {len(y_te)} {acfg['split']} images, {len(y_tr)} train images ({time.time() - t0:.0f}s)")
    num_classes = int(data_cfg["num_classes"])
    results: dict[str, Any] = {"settings": {**dict(acfg), "data": data_cfg["name"], "seed": cfg["seed"],
                                            "device": str(device)}, "models": {}}
    kept = {}
    for tag, (enc, clf, label, ck, clf_path) in loaded.items():
        log(f"[analysis] model {tag}: {label} ({ck})")
        res, feats = analyse_model(enc, clf, data, acfg, num_classes, device, log)
        results["models"][tag] = {"label": label, "checkpoint": str(Path(ck).absolute()),
                                  "classifier": str(Path(clf_path).absolute()) if clf_path else None, **res}
        kept[tag] = feats
    if "b" in kept:
        cross = cka_matrix(kept["a"]["clean"], kept["b"]["clean"], debiased=bool(acfg["debiased"]))
        results["cross"] = {"cka_clean": cross.tolist(), "layers_a": results["models"]["a"]["layers"],
                            "layers_b": results["models"]["b"]["layers"]}
    results["seconds"] = time.time() - t0
    save_results(out_dir, results)
    pngs = plot_results(out_dir, results)
    results["out_dir"], results["figures"] = str(out_dir), [str(p) for p in pngs]
    log(f"[analysis] wrote {out_dir}/analysis.json, analysis.npz and {len(pngs)} figures")
    return results


def default_out_dir(cfg: Mapping[str, Any], labels: list[str], models) -> Path:
    key = json.dumps({"analysis": cfg["analysis"], "data": cfg["data"]["name"], "seed": cfg["seed"],
                      "models": [[str(Path(ck).absolute()), clf] for _, ck, clf in models]}, sort_keys=True)
    slug = "-vs-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", lab) for lab in labels)
    return Path(cfg["output_dir"]) / f"analysis-{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


# ------------------------------------------------------------------------------------------ output
def save_results(out_dir: Path, results: Mapping[str, Any]) -> None:
    (out_dir / "analysis.json").write_text(json.dumps(results, indent=2, default=str))
    arrays: dict[str, np.ndarray] = {}
    for tag, m in results["models"].items():
        arrays[f"{tag}_layers"] = np.array(m["layers"])
        for key in ("cka_within_clean", "cka_within_adv", "cka_clean_vs_adv", "cka_same_layer_clean_vs_adv"):
            arrays[f"{tag}_{key}"] = np.asarray(m[key])
        for key, vals in (m.get("probes") or {}).items():
            arrays[f"{tag}_probe_{key}"] = np.asarray(vals)
    if "cross" in results:
        arrays["cross_cka_clean"] = np.asarray(results["cross"]["cka_clean"])
    np.savez(out_dir / "analysis.npz", **arrays)


def _heatmap(ax, matrix: np.ndarray, rows: list[str], cols: list[str], title: str, xlabel: str, ylabel: str):
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="magma", origin="lower")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if matrix.size <= 100:
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                v = matrix[i, j]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
    return im


def plot_results(out_dir: Path, results: Mapping[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    debiased = " (debiased)" if results["settings"].get("debiased") else ""
    steps = results["settings"]["pgd"]["steps"]
    for tag, m in results["models"].items():
        layers = m["layers"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), constrained_layout=True)
        _heatmap(axes[0], np.asarray(m["cka_within_clean"]), layers, layers, "clean inputs", "layer", "layer")
        im = _heatmap(axes[1], np.asarray(m["cka_within_adv"]), layers, layers,
                      f"adversarial inputs (PGD-{steps})", "layer", "layer")
        fig.colorbar(im, ax=axes, shrink=0.8, label="linear CKA")
        fig.suptitle(f"{m['label']}: CKA between layers{debiased}")
        paths.append(out_dir / f"cka_{tag}_within.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), constrained_layout=True)
        im = _heatmap(axes[0], np.asarray(m["cka_clean_vs_adv"]), layers, layers, "all layer pairs",
                      "layer (adversarial inputs)", "layer (clean inputs)")
        fig.colorbar(im, ax=axes[0], shrink=0.8, label="linear CKA")
        axes[1].plot(range(len(layers)), m["cka_same_layer_clean_vs_adv"], marker="o")
        axes[1].set_xticks(range(len(layers)), layers, rotation=45, ha="right")
        axes[1].set_ylim(0, 1.02)
        axes[1].set_ylabel("CKA(clean, adversarial) at the same layer")
        axes[1].grid(alpha=0.3)
        axes[1].set_title("same layer", fontsize=10)
        fig.suptitle(f"{m['label']}: clean vs adversarial (PGD-{steps}) representations{debiased}")
        paths.append(out_dir / f"cka_{tag}_clean_vs_adv.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    if "cross" in results:
        c = results["cross"]
        a, b = results["models"]["a"]["label"], results["models"]["b"]["label"]
        fig, ax = plt.subplots(figsize=(5.6, 4.8), constrained_layout=True)
        im = _heatmap(ax, np.asarray(c["cka_clean"]), c["layers_a"], c["layers_b"],
                      f"{a} vs {b}, clean inputs{debiased}", f"{b} layer", f"{a} layer")
        fig.colorbar(im, ax=ax, shrink=0.8, label="linear CKA")
        paths.append(out_dir / "cka_cross.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    if any(m.get("probes") for m in results["models"].values()):
        fig, ax = plt.subplots(figsize=(6.4, 4.4), constrained_layout=True)
        styles = {"clean": "-", "adv": "--", "adv_trained": ":"}
        names = {"clean": "clean probe, clean test", "adv": "clean probe, adversarial test",
                 "adv_trained": "adversarial probe, adversarial test"}
        for k, (tag, m) in enumerate(results["models"].items()):
            for key, vals in (m.get("probes") or {}).items():
                ax.plot(range(len(vals)), [100 * v for v in vals], styles[key], marker="o", color=f"C{k}",
                        label=f"{m['label']}: {names[key]}")
        layers = next(iter(results["models"].values()))["layers"]
        ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
        ax.set_ylabel("linear probe accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"per-layer linear probes (PGD-{steps} against the attacked classifier)", fontsize=10)
        paths.append(out_dir / "probes.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# --------------------------------------------------------------------------------------------- CLI
def _is_model_or_head(blob: Mapping[str, Any]) -> bool:
    return "encoder" in blob or "classifier" in blob


def run(cl: CommandLine) -> int:
    own = cl.own
    if not own.get("checkpoint"):
        raise ConfigError("checkpoint=None is invalid: give checkpoint=/path/to/model.pt")
    for key in ("checkpoint", "checkpoint_b", "classifier", "classifier_b"):
        if own.get(key) and not Path(own[key]).exists():
            raise ConfigError(f"{key}={own[key]!r} is invalid: file does not exist")
    cfg = compose(["+analysis=default"] + cl.overrides)
    for key in ("checkpoint", "checkpoint_b", "classifier", "classifier_b"):
        if own.get(key):
            head = key.startswith("classifier")
            load_checked(key, own[key], (lambda b: "classifier" in b) if head else _is_model_or_head,
                         "classifier_<protocol>.pt" if head else "model.pt or classifier_<protocol>.pt")
    if cl.show_cfg:
        print(json.dumps(cfg, indent=2))
        return 0
    results = run_analysis(cfg, own["checkpoint"], own.get("checkpoint_b"), own.get("classifier"),
                           own.get("classifier_b"), own.get("out"))
    print("\n".join(results["figures"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(__doc__, argv, run, own_keys=OWN_KEYS)


if __name__ == "__main__":
    raise SystemExit(main())
