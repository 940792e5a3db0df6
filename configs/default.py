"""The shared base configuration as a config file (see ``midpo/config_base.py``)."""

from midpo.config_base import get_config, prior_config  # noqa: F401
