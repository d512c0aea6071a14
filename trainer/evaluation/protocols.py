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
from data_pipeline.write import beton_path
from trainer.adversarial_training import normalized, supervised_loss
from trainer.attacks import pgd_config
from trainer.checkpoint import load_encoder
from trainer.distributed import WorkerContext, all_reduce_mean, all_reduce_sum
from trainer.evaluation.robustness import autoattack_accuracy, clean_and_pgd_counts
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
    ecfg, data = cfg["eval"], cfg["data"]
    tcfg = head_train_config(ecfg, spec)
    views = "weak" if ecfg["linear"]["augment"] == "weak" else "eval"  # eval: un-augmented images, shuffled
    loader = build_loader(str(beton_path(data, "train")), views, tcfg["batch_size"] // ctx.world_size, ctx.device,
                          ctx.num_threads, train=True, seed=int(cfg["seed"]), distributed=ctx.distributed,
                          augment=data["augment"])
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


def measure_robustness(cfg: Mapping[str, Any], ctx: WorkerContext, model: Classifier, protocol: str,
                    label: str) -> dict[str, float]:
    """SA and PGD RA on the whole test split (sharded), AutoAttack on rank 0's subset."""
    ecfg, data = cfg["eval"], cfg["data"]
    per_rank = int(ecfg["linear"]["batch_size"]) // ctx.world_size
    test = build_loader(str(beton_path(data, "test")), "eval", per_rank, ctx.device, ctx.num_threads,
                        train=False, distributed=ctx.distributed, drop_last=False)
    attacked = NormalizedLogits(model) if ecfg["attack_normalized_logits"] else model  # same predictions
    counts = all_reduce_sum(clean_and_pgd_counts(attacked, test, pgd_config(ecfg["pgd"])).counts(), ctx)
    result = {f"{protocol}_sa": counts["clean"] / counts["total"], f"{protocol}_ra": counts["robust"] / counts["total"],
              f"{protocol}_n_test": counts["total"]}
    aa = ecfg["autoattack"]
    if aa["enabled"]:
        value = torch.zeros((), device=ctx.device)
        if ctx.is_main:
            x, y = first_test_examples(data, aa["n_examples"], per_rank, ctx)
            t0 = time.time()
            value += autoattack_accuracy(model, x, y, float(ecfg["pgd"]["eps"]), int(data["num_classes"]),
                                         aa["version"])
            print(f"[{label}/{protocol}] AutoAttack on {len(y)} test images: {value.item():.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
            result[f"{protocol}_aa_n"] = float(len(y))
        result[f"{protocol}_aa"] = all_reduce_sum({"aa": value}, ctx)["aa"]
    return result


def run_protocol(cfg: Mapping[str, Any], ctx: WorkerContext, model_path: str, protocol: str, label: str,
                 report_each_epoch: Callable[[dict[str, float]], None],
                 wrap: Wrap) -> tuple[dict[str, float], Classifier]:
    """Train the protocol's head on the encoder at `model_path`, then measure it; (results, classifier)."""
    spec = protocol_spec(protocol, cfg["eval"])
    model, train_net = build_classifier(model_path, int(cfg["data"]["num_classes"]), spec, ctx, wrap,
                                        cfg["eval"]["linear"]["head_init"])
    train_head(cfg, ctx, model, train_net, spec, label, report_each_epoch)
    result = measure_robustness(cfg, ctx, model, protocol, label)
    if ctx.is_main:
        aa = f" AA {result[f'{protocol}_aa']:.4f}" if f"{protocol}_aa" in result else ""
        print(f"[{label}/{protocol}] SA {result[f'{protocol}_sa']:.4f} RA(PGD-{cfg['eval']['pgd']['steps']}) "
              f"{result[f'{protocol}_ra']:.4f}{aa}", flush=True)
    return result, model
