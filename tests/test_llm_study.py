"""The llm_table1 study end to end on its generated tiny checkpoint, through the command line: all stages, a run
killed mid-fine-tuning (the deterministic crash hook) and resumed giving the results of an uninterrupted run, and
bad inputs (model, data file, record, judge) ending with one line, exit 2 and nothing written."""
import json
import os
import signal
import subprocess
import sys

import pytest

from alignment_geom import harness
from alignment_geom.data import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 2 tasks × 2 methods, a shorter alignment of the generated model, no Lanczos (tests/test_aic_scale.py checks it)
TINY = ("configs/llm_table1.py:tiny,tasks=samsum/alpaca_top100,tiny_align_steps=60,n_bootstrap=50,lanczos_d=0,"
        "checkpoint_every=2")
LAST = "ft_alpaca_top100_lora"


def _env(cache):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["ALIGNMENT_GEOM_NO_PROGRESS"] = "1"
    env["ALIGNMENT_GEOM_JAX_CACHE"] = str(cache)       # the three runs share compiled programs
    env.pop(harness.CRASH_ENV, None)
    return env


def _run(args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llm")
    env = _env(tmp / "jax_cache")
    straight = tmp / "straight"
    p = _run([f"--config={TINY}", f"--workdir={straight}"], env)
    assert p.returncode == 0, p.stderr[-3000:]
    killed = tmp / "killed"
    p = _run([f"--config={TINY}", f"--workdir={killed}"], {**env, harness.CRASH_ENV: f"{LAST}:2"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    state = {"killed_results": (killed / "results.json").exists(),
             "killed_steps": sorted(int(n) for n in os.listdir(killed / "checkpoints" / LAST) if n.isdigit()),
             "killed_stages": sorted(os.listdir(killed / "stages"))}
    p = _run([f"--config={TINY}", f"--workdir={killed}"], env)
    assert p.returncode == 0, p.stderr[-3000:]
    return {"straight": straight, "killed": killed, **state}


def test_tiny_end_to_end_all_stages(runs):
    wd = runs["straight"]
    res = json.load(open(wd / "results.json"))
    assert {(r["task"], r["method"]) for r in res["table"]} == {(t, m) for t in ("samsum", "alpaca_top100")
                                                                for m in ("full", "lora")}
    for r in res["table"]:
        assert 1 <= r["hs_before"] <= 5 and 1 <= r["hs_after"] <= 5 and 0 <= r["asr_after"] <= 1
        assert 0 < r["os"] <= 1 and 0 < r["os_exact"] <= 1 and r["quad_M"] <= r["quad"] * (1 + 1e-9)
        assert r["task_loss_before"] > 0 and r["task_loss_after"] > 0
    assert set(res["correlation"]) == {"full", "lora"}
    for c in res["correlation"].values():
        assert set(c) >= {"pearson", "spearman", "n"} and set(c["pearson"]) == {"r", "p", "ci95"}
    assert res["judge"].startswith("keyword fallback") and res["inputs"]["generated_tiny"]
    assert res["safe_completions"]["n"] >= 3 and "refusals" in res["safe_completions"]["source"]
    assert len(res["fisher"]["gram_eigvals"]) == 3 and res["inputs"]["model_path"] == "inputs/model"
    for f in ("table1.md", "table1.csv", "llm_os_vs_dhs.png", "llm_fisher_spectrum.png", "inputs/model/config.json",
              "inputs/model/tokenizer.json", "inputs/model/model.safetensors", "inputs/data/advbench.jsonl"):
        assert (wd / f).exists(), f
    stages = set(os.listdir(wd / "stages"))
    assert {"base_eval.json", "safe_completions.json", "alpaca_top100.json", "fisher.npz",
            "eval_samsum_full.json", "geometry_alpaca_top100_lora.json"} <= stages


def test_killed_mid_finetune_resumes_to_identical_results(runs):
    assert not runs["killed_results"] and runs["killed_steps"] == [2]
    assert "eval_alpaca_top100_lora.json" not in runs["killed_stages"]
    assert "geometry_samsum_lora.json" in runs["killed_stages"]
    assert json.load(open(runs["killed"] / "timing.json"))["resumed"] is True
    assert json.load(open(runs["killed"] / "results.json")) == json.load(open(runs["straight"] / "results.json"))


def _bad_data(tmp_path, drop=None, malformed=None):
    d = tmp_path / "data"
    datasets.write_tiny(str(d), ("samsum", "alpaca", "advbench"), n=4)
    if drop:
        os.remove(d / f"{drop}.jsonl")
    if malformed:
        with open(d / f"{malformed}.jsonl", "a") as f:
            f.write(json.dumps({"dialogue": "hi"}) + "\n")
    return d


@pytest.mark.parametrize("case", ["model", "missing_file", "malformed", "judge"])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, case):
    args = [f"--config={TINY}"]
    if case == "model":
        args.append(f"--config.model_path={tmp_path / 'no_such_model'}")
        needle = "config.model_path="
    elif case == "missing_file":
        args.append(f"--config.data_dir={_bad_data(tmp_path, drop='samsum')}")
        needle = "no samsum data in"
    elif case == "malformed":
        args.append(f"--config.data_dir={_bad_data(tmp_path, malformed='samsum')}")
        needle = "line 5: record has no field 'summary'"
    else:
        args.append("--config.judge_url=http://127.0.0.1:9/v1")
        needle = "cannot be reached"
    wd = tmp_path / "wd"
    p = _run(args + [f"--workdir={wd}"], _env("off"), timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not wd.exists()
