"""The one PGD engine every method and evaluation calls with its own objective."""
from trainer.attacks.pgd import PGDConfig, frozen_parameters, network_mode, pgd_attack

__all__ = ["PGDConfig", "pgd_attack", "network_mode", "frozen_parameters"]
