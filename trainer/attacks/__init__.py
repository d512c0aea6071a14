"""The one PGD engine every method and evaluation calls with its own objective."""
from trainer.attacks.pgd import PGDConfig, pgd_attack, network_mode

__all__ = ["PGDConfig", "pgd_attack", "network_mode"]
