"""The one PGD engine every method and evaluation calls with its own objective."""
from trainer.attacks.pgd import (PGDConfig, frozen_parameters, merged_attack, network_mode, pgd_attack, pgd_config,
                                 random_start)

__all__ = ["PGDConfig", "pgd_attack", "pgd_config", "merged_attack", "network_mode", "frozen_parameters",
           "random_start"]
