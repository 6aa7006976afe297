"""The experiment harness: everything between the library and a figure on disk.

    errors        ConfigError (bad input, exit 2), NonFiniteError (NaN/Inf, exit 3), check_finite
    validation    require_* helpers for configs
    config        load_config("configs/NAME.py:ARGS"), configs_dir()
    jsonio        to_jsonable, write_json, env_info
    workdir       prepare_workdir (resume / refuse), clear_workdir
    study         run_study (one study into its workdir), format_summary
    distributed   cluster detection, grid_mesh, sharded_vmap, grid_product
    checkpoint    checkpointed_loop, checkpointed_map, save_tree, restore_tree (orbax)
    progress      progress bars
    plotting      new_figure, reference_slope, save_figure (PNG + PDF)
    runtime       setup (XLA flags, float64, compile cache, cluster init), quiet_logs, ensure_x64, dtype_of
"""
from alignment_geom.harness.checkpoint import CRASH_ENV, checkpointed_loop, checkpointed_map, restore_tree, save_tree
from alignment_geom.harness.config import configs_dir, load_config
from alignment_geom.harness.distributed import (
    cluster_env_present,
    grid_mesh,
    grid_product,
    maybe_initialize_distributed,
    sharded_vmap,
)
from alignment_geom.harness.errors import ConfigError, NonFiniteError, check_finite
from alignment_geom.harness.jsonio import config_to_dict, env_info, to_jsonable, write_json
from alignment_geom.harness.plotting import new_figure, reference_slope, save_figure
from alignment_geom.harness.progress import progress
from alignment_geom.harness.runtime import (
    default_xla_flags,
    dtype_of,
    enable_compilation_cache,
    ensure_x64,
    log,
    quiet_logs,
    setup,
)
from alignment_geom.harness.study import FLOAT64_WARNING, format_summary, run_study, validate_study
from alignment_geom.harness.validation import (
    DTYPES,
    require_choice,
    require_d_le_n,
    require_increasing,
    require_int,
    require_nonempty,
    require_positive,
    validate_common,
)
from alignment_geom.harness.workdir import clear_workdir, prepare_workdir

__all__ = [
    "ConfigError", "NonFiniteError", "check_finite",
    "DTYPES", "require_positive", "require_nonempty", "require_increasing", "require_int", "require_choice",
    "require_d_le_n", "validate_common",
    "load_config", "configs_dir",
    "to_jsonable", "config_to_dict", "write_json", "env_info",
    "prepare_workdir", "clear_workdir",
    "FLOAT64_WARNING", "validate_study", "run_study", "format_summary",
    "cluster_env_present", "maybe_initialize_distributed", "grid_mesh", "sharded_vmap", "grid_product",
    "CRASH_ENV", "checkpointed_loop", "checkpointed_map", "save_tree", "restore_tree",
    "progress", "new_figure", "reference_slope", "save_figure",
    "log", "ensure_x64", "dtype_of", "enable_compilation_cache", "default_xla_flags", "setup", "quiet_logs",
]
