"""The one PGD engine every method and evaluation calls with its own objective."""
from trainer.attacks.pgd import PGDConfig, frozen_parameters, network_mode, pgd_attack, pgd_config

__all__ = ["PGDConfig", "pgd_attack", "pgd_config", "network_mode", "frozen_parameters"]
