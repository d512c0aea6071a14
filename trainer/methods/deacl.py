"""DeACL stage 2 (Zhang et al. 2022): distil a frozen SSL teacher into a robust student.

Attack (student in eval mode): PGD maximising -cos(f_s(x'), f_t(x)).
Loss: -mean cos(f_s(x), f_t(x)) - lam * mean cos(f_s(x'), f_s(x)), with the clean and
adversarial batch through the student in ONE concatenated forward (shared BN statistics).
The teacher is frozen: eval mode, requires_grad=False, run under no_grad (the reference code
backpropagates through it needlessly). Features are backbone outputs; no projector.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from trainer.attacks import pgd_attack
from trainer.checkpoint import load_encoder
from trainer.losses import deacl_attack_objective, deacl_loss
from trainer.methods.base import Method, register_method


@register_method("deacl")
class DeACL(Method):
    views = "weak"
    needs_projector = False

    def __init__(self, cfg: Mapping[str, Any], method_cfg: Mapping[str, Any], device: torch.device,
                 teacher_path: str | None = None) -> None:
        super().__init__(cfg, method_cfg, device)
        if not teacher_path:
            raise ValueError("DeACL needs a teacher checkpoint (teacher.checkpoint, or recipe=deacl)")
        self.teacher = load_encoder(teacher_path, device=device, with_projector=False)
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if method_cfg["init_from_teacher"]:
            missing, unexpected = self.encoder.load_state_dict(self.teacher.state_dict(), strict=False)
            if missing:
                raise ValueError(f"teacher checkpoint does not fit the student model: missing {missing[:5]}")

    def train(self) -> None:
        self.encoder.train()
        self.teacher.eval()

    def inference_modules(self) -> list[torch.nn.Module]:
        return [self.encoder, self.teacher]  # the teacher gets the same layout / compilation

    def training_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        (x,) = batch["views"]
        b = x.shape[0]
        with torch.no_grad():
            f_t = self.teacher(x)
        with self.attack_mode(train=False):
            x_adv = pgd_attack(x, lambda xa: deacl_attack_objective(self.encoder(xa), f_t), self.attack)
        f_s = self.net(torch.cat([x, x_adv]))
        loss = deacl_loss(f_s[:b], f_s[b:], f_t, float(self.mcfg["lam"]))
        with torch.no_grad():
            cos_t = torch.nn.functional.cosine_similarity(f_s[:b], f_t).mean()
            cos_adv = torch.nn.functional.cosine_similarity(f_s[b:], f_s[:b]).mean()
        return loss, {"loss": loss.detach(), "cos_teacher": cos_t, "cos_adv": cos_adv}
