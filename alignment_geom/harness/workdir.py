"""Workdirs: a run's directory holds its config.json; rerunning the same config resumes, a different one is refused."""
from __future__ import annotations

import json
import os
import shutil

import jax

from alignment_geom.harness.errors import ConfigError

__all__ = ['prepare_workdir', 'clear_workdir']


def prepare_workdir(config_dict: dict, workdir: str, overwrite: bool = False) -> bool:
    """Check (without writing) that ``workdir`` may take this config.

    Returns True when the workdir already holds the same config (a resume). Raises ConfigError when
    it holds a different config (unless ``overwrite``) or is a non-empty directory that is not a
    workdir of ours, or exists as a file.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError("workdir", workdir, "a directory path (this is a file)")
    cfg_path = os.path.join(workdir, "config.json")
    if os.path.isdir(workdir) and os.listdir(workdir) and not os.path.exists(cfg_path):
        raise ConfigError("workdir", workdir, "an empty or new directory, or a previous run's workdir "
                          "(this one is non-empty and holds no config.json)")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            old = json.load(f)
        if old == json.loads(json.dumps(config_dict)):
            return not overwrite
        if not overwrite:
            diff = sorted(k for k in set(old) | set(config_dict) if old.get(k) != config_dict.get(k))
            raise ConfigError("workdir", workdir, "a workdir holding the same config (it holds a different "
                              f"one: fields {', '.join(diff)} differ); pass --overwrite to replace it")
    return False


def clear_workdir(workdir: str) -> None:
    if jax.process_index() != 0 or not os.path.isdir(workdir):
        return
    for name in os.listdir(workdir):
        p = os.path.join(workdir, name)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
