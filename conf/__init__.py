"""The config layer (a leaf: it imports nothing of the project): Hydra option files (the YAML groups
in this folder), the typed schema every key is validated against (`conf.schema`), composition
(`compose`), cross-field rules (`conf.rules`) and the command-line helper of every entry point
(`conf.cli`). See docs/config.md."""
from conf.compose import (CONF_DIR, compose, compose_raw, config_hash, default_run_name, legacy_config_hash,
                          validate)
from conf.errors import ConfigError, RunStopped, invalid

__all__ = ["CONF_DIR", "ConfigError", "compose", "compose_raw", "config_hash", "default_run_name", "invalid",
           "legacy_config_hash", "RunStopped", "validate"]
