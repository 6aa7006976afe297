"""The command line: ``alignment-geom-run`` / ``python -m experiments.run`` (one study) and ``alignment-geom-figures``
/ ``python -m experiments.figures`` (the main job). Flags are parsed here and nothing else; every bad input is
one line on stderr with exit status 2 and nothing written; NaN/Inf along a trajectory exits with 3 (partial
results kept).

    alignment-geom-run --config=configs/NAME.py[:ARGS] [--config.FIELD=VALUE ...] --workdir=DIR [--overwrite]
    alignment-geom-figures --outdir=figures [--preset=default|smoke|large] [--only=a,b] [--overwrite]

Multi-host (TPU pod slice): run the same command on every worker; ``jax.distributed.initialize()`` is called
when the environment describes a cluster (TPU pod, JAX_COORDINATOR_ADDRESS, SLURM/Open MPI with several
tasks); sweeps then span all chips and process 0 writes the files (use a workdir every worker sees).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from absl import app, flags
from ml_collections import config_flags

from alignment_geom import harness, studies
from alignment_geom.harness import ConfigError, NonFiniteError

__all__ = ["die", "flags_parser", "resolved_config", "run_one", "summary_line", "run_main", "figures_main"]


def die(message: str, status: int = 2):
    """Print ``error: message`` as one line on stderr and exit with ``status`` (2 = bad input)."""
    sys.stderr.write("error: " + " ".join(str(message).split()) + "\n")
    sys.stderr.flush()
    sys.exit(status)


def _unknown_override(argv: Sequence[str]) -> Optional[str]:
    """The first --config.FIELD override in argv whose FIELD is not in the loaded config (or None)."""
    cfg_arg = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("--config=")), None)
    if cfg_arg is None:
        return None
    try:
        config = harness.load_config(cfg_arg)
    except Exception:  # noqa: BLE001
        return None
    for a in argv:
        if a.startswith("--config.") and "=" in a:
            path = a[len("--config."):].split("=", 1)[0]
            node = config
            for part in path.split("."):
                if not hasattr(node, "keys") or part not in node:
                    return f"config.{path}: unknown config field; allowed fields are {', '.join(sorted(config.keys()))}"
                node = node[part]
        elif a.startswith("--config.") and "=" not in a:
            path = a[len("--config."):]
            if path not in config:
                return f"config.{path}: unknown config field; allowed fields are {', '.join(sorted(config.keys()))}"
    return None


def flags_parser(argv):
    """absl flags parser that turns every flag/config error into one line + exit status 2."""
    try:
        return flags.FLAGS(argv)
    except ConfigError as e:
        die(str(e))
    except ValueError as e:
        if hasattr(e, "allowed"):           # configs.common.ConfigArgError from get_config(ARGS)
            die(str(e))
        die(_unknown_override(argv) or f"invalid --config: {e}")
    except flags.Error as e:
        msg = str(e)
        if "--config." in msg or "config" in msg:
            msg = msg.replace("flag --config.", "config.")
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        pick = next((ln for ln in lines if "is not allowed" in ln), lines[0] if lines else msg)
        pick = pick[pick.index("config."):] if "is not allowed" in pick and "config." in pick else pick
        die(pick + ("" if "allowed" in pick else " (see the config's fields and types)"))
    except (AttributeError, KeyError, TypeError) as e:
        unknown = _unknown_override(argv)
        die(unknown or f"invalid --config: {e}")
    except Exception as e:  # noqa: BLE001
        die(f"invalid --config ({type(e).__name__}): {e}")


def resolved_config(config_flag, argv):
    """The parsed config from a config_flags holder; one-line exit 2 when it could not be loaded."""
    try:
        config = config_flag.value
        if config is None:
            die("--config is required: allowed is configs/NAME.py[:ARGS]")
        _ = config.keys()
    except ConfigError as e:
        die(str(e))
    except ValueError as e:
        if hasattr(e, "allowed"):
            die(str(e))
        spec = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("--config=")), "")
        die(f"config={spec!r} could not be loaded (ValueError: {e}): allowed is an existing configs/NAME.py[:ARGS]")
    except Exception as e:  # noqa: BLE001
        spec = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("--config=")), "")
        die(f"config={spec!r} could not be loaded ({type(e).__name__}: {e}): "
            "allowed is an existing configs/NAME.py[:ARGS]")
    return config


def run_one(config, workdir: str, overwrite: bool = False) -> dict:
    """run() for the command line: ConfigError -> exit 2, NonFiniteError -> exit 3 (partial results kept)."""
    harness.quiet_logs()
    try:
        results = studies.run(config, workdir, overwrite=overwrite)
    except ConfigError as e:
        die(str(e), 2)
    except NonFiniteError as e:
        die(f"{e}; partial results kept in {os.path.join(workdir, 'results.json')}", 3)
    print(json.dumps(summary_line(results), sort_keys=True))
    return results


def summary_line(results: dict) -> dict:
    """The scalar entries of a results dict (what the command line prints)."""
    flat = harness.to_jsonable(results)
    return {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _run(argv):
    if len(argv) > 1:
        die(f"unexpected positional arguments {argv[1:]!r}: allowed are only --config, --config.FIELD, --workdir, "
            "--overwrite")
    config = resolved_config(flags.FLAGS["config"], sys.argv)
    workdir = flags.FLAGS.workdir
    if not workdir:
        die("--workdir is required: allowed is a directory path (created if missing)")
    run_one(config, workdir, flags.FLAGS.overwrite)


def run_main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``alignment-geom-run`` (and ``python -m experiments.run``): one study into --workdir."""
    config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARGS]", lock_config=True)
    flags.DEFINE_string("workdir", None, "output directory (created; resumed when it holds the same config)")
    flags.DEFINE_bool("overwrite", False, "replace a workdir that holds a different config")
    harness.setup()
    app.run(_run, argv=list(sys.argv if argv is None else argv), flags_parser=flags_parser)


def _figures(argv):
    if len(argv) > 1:
        die(f"unexpected positional arguments {argv[1:]!r}")
    harness.quiet_logs()
    F = flags.FLAGS
    try:
        status = studies.main_job(F.outdir, preset=F.preset, only=F.only, overwrite=F.overwrite)
    except ConfigError as e:
        die(str(e))
    sys.exit(status)


def figures_main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``alignment-geom-figures`` (and ``python -m experiments.figures``): the main job."""
    flags.DEFINE_string("outdir", "figures", "output directory for all figures")
    flags.DEFINE_string("preset", "default", "config preset for every study: smoke, default or large")
    flags.DEFINE_list("only", [], "comma-separated subset of studies (default: all of the main job)")
    flags.DEFINE_bool("overwrite", False, "replace workdirs that hold a different config")
    harness.setup()
    app.run(_figures, argv=list(sys.argv if argv is None else argv), flags_parser=flags_parser)
