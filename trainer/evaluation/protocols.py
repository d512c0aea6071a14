"""SLF / ALF / AFF (and RoCL's LE / rLE): a new head on a trained encoder, then SA / PGD / AutoAttack.

- slf: encoder frozen, new linear head trained with CE on clean images.
- alf: encoder frozen, head trained adversarially (eval.alf_loss: TRADES by default, PGD-AT, or the
  study's CE(x) + CE(x')).
- aff: everything trained (eval.aff_loss: TRADES, beta=6, by default).
- le / rle: RoCL's linear evaluation on clean / PGD-10 adversarial examples (= slf / alf with PGD-AT).
"Frozen" protocols put the encoder's BN in eval mode (eval.bn_mode=eval) or, like DeACL's reference
code, leave it in train mode so that its running statistics move (eval.bn_mode=train).
Then SA and PGD-20 RA on the test split (sharded across workers, counts all-reduced) and
AutoAttack on a subset. DeACL's recipe is the default (SGD 0.9, wd 2e-4, lr/10 at 15 and 20);
the other references' recipes are keys (docs/fidelity.md): the heads' training images
(eval.linear.augment), head init, TRADES' forwards, the training attack's step size and BN mode,
and attacks on L2-normalised logits (the study).

`run_protocol` is what the evaluate worker (trainer/worker/evaluate.py) runs per protocol; the
DDP wrap comes from the worker (`wrap`), so this module needs no Ray.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from data_pipeline.loaders import build_loader
from data_pipeline.write import beton_path, read_beton_labels, stratified_subset
from trainer.adversarial_training import normalized, supervised_loss
from trainer.attacks import pgd_config
from trainer.checkpoint import load_encoder
from trainer.distributed import WorkerContext, all_reduce_mean, all_reduce_sum
from trainer.evaluation.autoattack import after_key, result_keys, run_autoattack
from trainer.evaluation.datasets import eval_data, metric_prefix
from trainer.evaluation.robustness import RobustCounts, attacked_batches, clean_and_pgd_counts, rank_share
from trainer.evaluation.shift import measure_blackbox, measure_corruptions
from trainer.optim import build_optimizer, build_scheduler
from trainer.progress import Progress

Wrap = Callable[[nn.Module], nn.Module]


class Classifier(nn.Module):
    """Encoder (with its normalisation) + linear head: pixels in [0,1] -> logits."""

    def __init__(self, encoder: nn.Module, num_classes: int, head_init: str = "default") -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, num_classes)
        if head_init == "zero":  # ACL's cvt_state_dict: fc weight and bias start at 0
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class NormalizedLogits(nn.Module):
    """A classifier whose logits are L2-normalised (what the study's attacks see; argmax unchanged)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalized(self.model)(x)


PROTOCOL_LOSS = {"slf": "ce", "le": "ce", "alf": "trades", "rle": "pgd_at", "aff": "trades"}
FULL_FINETUNE = {"aff"}


@dataclass(frozen=True)
class Protocol:
    name: str
    loss: str   # ce | trades | pgd_at
    full: bool  # the encoder is fine-tuned too
    lr: float


def protocol_loss(protocol: str, ecfg: Mapping[str, Any]) -> str:
    """The head's training loss: ce | trades | pgd_at | ce_clean_adv (ALF's is eval.alf_loss, AFF's eval.aff_loss)."""
    if protocol == "alf":
        return ecfg["alf_loss"]
    if protocol == "aff":
        return ecfg.get("aff_loss", PROTOCOL_LOSS["aff"])
    return PROTOCOL_LOSS[protocol]


def protocol_spec(protocol: str, ecfg: Mapping[str, Any]) -> Protocol:
    return Protocol(protocol, protocol_loss(protocol, ecfg), protocol in FULL_FINETUNE,
                    float(ecfg["linear"]["lr"][protocol]))


def set_train_modes(model: Classifier, full: bool, bn_mode: str = "eval") -> None:
    """Modes for one training epoch: everything in train mode; a frozen encoder goes to eval mode
    (BN running statistics fixed) unless bn_mode == "train" (DeACL's reference quirk)."""
    model.train()
    if not full and bn_mode == "eval":
        model.encoder.eval()


def head_train_config(ecfg: Mapping[str, Any], spec: Protocol) -> dict[str, Any]:
    """The head's optimisation as a `method.train`-shaped section (for trainer.optim)."""
    lin = ecfg["linear"]
    return {"epochs": lin["epochs"], "batch_size": lin["batch_size"], "optimizer": lin["optimizer"], "lr": spec.lr,
            "lr_scaling": "none", "momentum": lin["momentum"], "weight_decay": lin["weight_decay"],
            "warmup_epochs": 0, "schedule": "step", "milestones": lin["milestones"], "fused": "auto"}


def build_classifier(model_path: str, num_classes: int, spec: Protocol, ctx: WorkerContext,
                     wrap: Wrap, head_init: str = "default") -> tuple[Classifier, Callable[[torch.Tensor], torch.Tensor]]:
    """(classifier, its training forward): the whole model wrapped for AFF, else the head only."""
    encoder = load_encoder(model_path, ctx.device, with_projector=False)
    model = Classifier(encoder, num_classes, head_init).to(ctx.device)
    for p in encoder.parameters():
        p.requires_grad_(spec.full)
    if spec.full:
        return model, wrap(model)
    head = wrap(model.head)
    return model, lambda x: head(model.encoder(x))


def train_head(cfg: Mapping[str, Any], ctx: WorkerContext, model: Classifier, train_net, spec: Protocol,
               label: str, report_each_epoch: Callable[[dict[str, float]], None]) -> None:
    """Train the head (or, for AFF, everything) for eval.linear.epochs; one report per epoch but the last."""
    ecfg = cfg["eval"]
    tcfg = head_train_config(ecfg, spec)
    loader = head_train_loader(cfg, ctx, tcfg["batch_size"] // ctx.world_size)
    opt = build_optimizer(model.parameters(), tcfg)
    sched = build_scheduler(opt, tcfg, len(loader))
    attack = train_attack(ecfg)
    options = loss_options(ecfg)
    progress = Progress(f"{label}/{spec.name}", tcfg["epochs"], 0, ctx.is_main)
    for epoch in range(tcfg["epochs"]):
        loader.set_epoch(epoch)
        set_train_modes(model, spec.full, ecfg["bn_mode"])
        t0, n = time.time(), 0
        loss_sum = torch.zeros((), device=ctx.device)
        correct = torch.zeros((), device=ctx.device)
        for batch in loader:
            x, y = batch["views"][0], batch["label"]
            loss, logits = supervised_loss(spec.loss, model, train_net, x, y, attack, **options)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
            n += y.shape[0]
        metrics = all_reduce_mean({"train_loss": loss_sum / max(1, len(loader)), "train_acc": correct / max(1, n)}, ctx)
        progress.epoch_line(epoch, n * ctx.world_size, time.time() - t0, metrics)
        if epoch + 1 < tcfg["epochs"]:
            report_each_epoch({f"{spec.name}_{k}": v for k, v in metrics.items()})


def head_train_loader(cfg: Mapping[str, Any], ctx: WorkerContext, per_rank: int):
    """The heads' training loader: weak views (or un-augmented, shuffled), all of the training split
    or its eval.label_fraction (class-stratified, seeded; the last partial batch is kept)."""
    ecfg, data = cfg["eval"], cfg["data"]
    path = str(beton_path(data, "train"))
    views = "weak" if ecfg["linear"]["augment"] == "weak" else "eval"  # eval: un-augmented images, shuffled
    fraction = ecfg["label_fraction"]
    indices = None if fraction is None else stratified_subset(read_beton_labels(path), fraction, int(cfg["seed"]))
    if ctx.is_main and indices is not None:
        print(f"[eval] heads train on {len(indices)} labelled images (label_fraction {fraction})", flush=True)
    return build_loader(path, views, per_rank, ctx.device, ctx.num_threads, train=True, seed=int(cfg["seed"]),
                        distributed=ctx.distributed, augment=data["augment"],
                        drop_last=None if indices is None else False, indices=indices)


def train_attack(ecfg: Mapping[str, Any]):
    """The heads' training attack: eval.pgd's start, eval.train_attack_steps / _alpha / _eps (null: eval.pgd's)."""
    changes = {k: float(ecfg[f"train_attack_{k}"]) for k in ("alpha", "eps") if ecfg[f"train_attack_{k}"] is not None}
    return pgd_config(ecfg["pgd"], steps=int(ecfg["train_attack_steps"]), **changes)


def loss_options(ecfg: Mapping[str, Any]) -> dict[str, Any]:
    """supervised_loss's keywords for the heads (TRADES beta and forwards, attack mode, logits)."""
    return {"beta": float(ecfg["linear"]["trades_beta"]), "trades_forwards": ecfg["linear"]["trades_forwards"],
            "attack_train_mode": None if ecfg["train_attack_mode"] == "training" else False,
            "normalize_logits": "attack" if ecfg["attack_normalized_logits"] else "none"}


def first_test_examples(data: Mapping[str, Any], n: int | None, batch: int,
                        ctx: WorkerContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n test images (all with n=None), in order, on this process's device."""
    loader = build_loader(str(beton_path(data, "test")), "eval", batch, ctx.device, ctx.num_threads,
                          train=False, drop_last=False)
    xs, ys, have = [], [], 0
    for b in loader:
        xs.append(b["views"][0])
        ys.append(b["label"])
        have += len(ys[-1])
        if n is not None and have >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def sharded_test_loader(data: Mapping[str, Any], ctx: WorkerContext, per_rank: int):
    """The whole test split, in order, this rank's shard (every image once: no drop_last)."""
    return build_loader(str(beton_path(data, "test")), "eval", per_rank, ctx.device, ctx.num_threads,
                        train=False, distributed=ctx.distributed, drop_last=False)


def pgd_progress(stage: str, what: str, total_batches: int,
                 enabled: bool) -> Callable[[RobustCounts], None] | None:
    """A progress line per attacked batch (rank 0): images done, robust accuracy so far, ETA."""
    if not enabled:
        return None
    t0, done = time.time(), [0]

    def show(c: RobustCounts) -> None:
        done[0] += 1
        Progress.items_line(stage, what, done[0], total_batches, time.time() - t0,
                            {"images": c.total, "robust_so_far": c.robust / max(1, c.total)}, unit="batches")
    return show


def measure_robustness(cfg: Mapping[str, Any], ctx: WorkerContext, model: Classifier, protocol: str,
                       label: str) -> dict[str, float]:
    """SA and PGD RA on the whole test split (sharded), AutoAttack on rank 0's subset."""
    ecfg, data = cfg["eval"], cfg["data"]
    per_rank = int(ecfg["linear"]["batch_size"]) // ctx.world_size
    test = sharded_test_loader(data, ctx, per_rank)
    attacked = NormalizedLogits(model) if ecfg["attack_normalized_logits"] else model  # same predictions
    pgd, stage = pgd_config(ecfg["pgd"]), f"{label}/{protocol}"
    show = pgd_progress(stage, f"PGD-{pgd.steps} (test split)", len(test), ctx.is_main)
    counts = all_reduce_sum(clean_and_pgd_counts(attacked, test, pgd, on_batch=show).counts(), ctx)
    result = {f"{protocol}_sa": counts["clean"] / counts["total"], f"{protocol}_ra": counts["robust"] / counts["total"],
              f"{protocol}_n_test": counts["total"]}
    if ecfg["autoattack"]["enabled"]:
        result.update(measure_autoattack(cfg, ctx, model, attacked, protocol, stage, per_rank))
    if ecfg["curve"]["eps"]:
        result.update(measure_curve(cfg, ctx, attacked, protocol, stage, per_rank))
    return result


def curve_key(protocol: str, eps: float) -> str:
    """The metric of the robustness curve at one radius: `<p>_curve_ra_at_<eps>`."""
    return f"{protocol}_curve_ra_at_{eps:.6f}"


def measure_curve(cfg: Mapping[str, Any], ctx: WorkerContext, attacked: nn.Module, protocol: str, stage: str,
                  per_rank: int) -> dict[str, float]:
    """PGD accuracy at each eval.curve.eps on the test split (sharded), step size 2.5 eps / steps."""
    ccfg, data = cfg["eval"]["curve"], cfg["data"]
    out: dict[str, float] = {}
    for eps in ccfg["eps"]:
        test = sharded_test_loader(data, ctx, per_rank)
        pgd = pgd_config(cfg["eval"]["pgd"], eps=float(eps), alpha=2.5 * float(eps) / ccfg["steps"],
                         steps=int(ccfg["steps"]))
        cap = rank_share(ccfg["n_examples"], ctx.world_size)
        show = pgd_progress(stage, f"curve PGD-{pgd.steps} at eps {eps:.4g}",
                            attacked_batches(len(test), cap, per_rank), ctx.is_main)
        counts = all_reduce_sum(clean_and_pgd_counts(attacked, test, pgd, max_examples=cap, on_batch=show).counts(),
                                ctx)
        out[curve_key(protocol, float(eps))] = counts["robust"] / counts["total"]
    return out


def measure_autoattack(cfg: Mapping[str, Any], ctx: WorkerContext, model: nn.Module, attacked: nn.Module,
                       protocol: str, stage: str, per_rank: int) -> dict[str, float]:
    """AutoAttack (pyautoattack) on rank 0's first test images, and SA / PGD RA on those same images:
    `<p>_aa`, `<p>_aa_n`, `<p>_aa_sa`, `<p>_aa_ra`, `<p>_aa_after_<attack>`; every rank gets them."""
    ecfg, aa = cfg["eval"], cfg["eval"]["autoattack"]
    values: dict[str, float] = {}
    if ctx.is_main:
        x, y = first_test_examples(cfg["data"], aa["n_examples"], per_rank, ctx)
        pgd = pgd_config(ecfg["pgd"])
        same = clean_and_pgd_counts(attacked, zip(x.split(per_rank), y.split(per_rank)), pgd,
                                    on_batch=pgd_progress(stage, f"PGD-{pgd.steps} (AutoAttack's images)",
                                                          -(-len(y) // per_rank), True))
        eps = float(aa["eps"] if aa["eps"] is not None else ecfg["pgd"]["eps"])
        res = run_autoattack(model, x, y, eps=eps, num_classes=int(cfg["data"]["num_classes"]), norm=aa["norm"],
                             version=aa["version"], seed=int(cfg["seed"]), batch_size=per_rank, label=stage)
        print(f"[{stage}] AutoAttack ({aa['version']}, {aa['norm']}, eps {eps:.4g}) on {res.n} test images: "
              f"{res.robust:.4f}; SA {same.clean / same.total:.4f}, PGD {same.robust / same.total:.4f} on the "
              f"same images ({res.seconds:.0f}s)", flush=True)
        values = {"aa": res.robust, "aa_n": res.n, "aa_sa": same.clean / same.total,
                  "aa_ra": same.robust / same.total, **{after_key(a): v for a, v in res.after.items()}}
    reduced = all_reduce_sum({k: values.get(k, 0.0) for k in result_keys(aa["version"])}, ctx)
    return {f"{protocol}_{k}": v for k, v in reduced.items()}


def load_classifier(blob: Mapping[str, Any], device: torch.device | str = "cpu",
                    arch: Mapping[str, Any] | None = None) -> Classifier:
    """A classifier_<protocol>.pt the evaluate stage wrote, in eval mode; its encoder's architecture from
    the file (or from `arch`, the encoder's model.pt, for files written before they carried it)."""
    from trainer.models import build_encoder

    src = blob if "model_cfg" in blob else arch
    if src is None:
        raise ValueError("the classifier file has no model_cfg (written before classifiers carried it); "
                         "give the encoder's model.pt too")
    state = blob["classifier"]
    num_classes = int(blob.get("num_classes") or state["head.weight"].shape[0])
    clf = Classifier(build_encoder(src["model_cfg"], src["stats"], with_projector=False), num_classes)
    clf.load_state_dict(state)
    return clf.to(device).eval()


def build_surrogate(cfg: Mapping[str, Any], ctx: WorkerContext, path: str, spec: Protocol, label: str,
                    wrap: Wrap) -> nn.Module:
    """The black-box surrogate: a classifier file as it is, or a head trained on a model.pt's encoder exactly
    as the target's (same protocol, data, recipe and seed)."""
    from trainer.checkpoint import load_model_file

    blob = load_model_file(path)
    if "classifier" in blob:
        return load_classifier(blob, ctx.device)
    model, train_net = build_classifier(path, int(cfg["data"]["num_classes"]), spec, ctx, wrap,
                                        cfg["eval"]["linear"]["head_init"])
    train_head(cfg, ctx, model, train_net, spec, f"{label}/surrogate", lambda metrics: None)
    return model


def run_protocol(cfg: Mapping[str, Any], ctx: WorkerContext, model_path: str, protocol: str, label: str,
                 report_each_epoch: Callable[[dict[str, float]], None],
                 wrap: Wrap, surrogate: str | None = None) -> tuple[dict[str, float], Classifier]:
    """Train the protocol's head on the encoder at `model_path` (on eval.data under transfer), then measure it:
    SA / PGD / AutoAttack / curve, corruptions, black-box from `surrogate`; (results, classifier)."""
    prefix, cfg = metric_prefix(protocol, cfg), {**cfg, "data": eval_data(cfg)}
    spec = protocol_spec(protocol, cfg["eval"])
    model, train_net = build_classifier(model_path, int(cfg["data"]["num_classes"]), spec, ctx, wrap,
                                        cfg["eval"]["linear"]["head_init"])
    train_head(cfg, ctx, model, train_net, spec, label, report_each_epoch)
    result = measure_robustness(cfg, ctx, model, prefix, label)
    per_rank = int(cfg["eval"]["linear"]["batch_size"]) // ctx.world_size
    if cfg["eval"]["corruptions"]["root"]:
        result.update(measure_corruptions(cfg, ctx, model, prefix, f"{label}/{prefix}", per_rank))
    if surrogate:
        source = build_surrogate(cfg, ctx, surrogate, spec, label, wrap)
        test = sharded_test_loader(cfg["data"], ctx, per_rank)
        attacked = attacked_batches(len(test), rank_share(cfg["eval"]["blackbox"]["n_examples"], ctx.world_size),
                                    per_rank)
        show = pgd_progress(f"{label}/{prefix}", "black-box PGD", attacked, ctx.is_main)
        result.update(measure_blackbox(cfg, ctx, model, source, prefix, f"{label}/{prefix}", test, show))
    if ctx.is_main:
        aa = f" AA {result[f'{prefix}_aa']:.4f}" if f"{prefix}_aa" in result else ""
        print(f"[{label}/{prefix}] SA {result[f'{prefix}_sa']:.4f} RA(PGD-{cfg['eval']['pgd']['steps']}) "
              f"{result[f'{prefix}_ra']:.4f}{aa}", flush=True)
    return result, model
