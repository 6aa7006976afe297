"""One config module per experiment (``get_config(arg)``); shared pieces in :mod:`configs.common`."""
