"""Mutation testing of the numerics modules with mutmut, one module (or group) at a time, against its own tests.

    python scripts/mutation.py metrics                # one target by its short name
    python scripts/mutation.py repro/utils/io.py      # or by path
    python scripts/mutation.py metrics io transport   # several, one after another
    python scripts/mutation.py --list                 # the targets and the tests each runs
    python scripts/mutation.py io --show              # also print the diff of every surviving mutant
    python scripts/mutation.py unet --recheck _size   # apply the last run's survivors by hand, run the tests
    python scripts/mutation.py sampling --rerun       # mutmut again on the last run's survivors and timeouts
    python scripts/mutation.py sampling --rerun "*auto_batch_size*"   # ... and on every mutant of a changed function

Not part of the test suite (pytest never collects scripts/). Each target runs in a fresh copy of the
checkout (tracked and untracked-not-ignored files) under a temp folder, so the working tree never gets a
`mutants/` folder and several targets never share mutmut's cache. In that copy, pyproject.toml's
[tool.mutmut] section gets the target's `only_mutate` and test selection; everything else comes from the
checkout's own section. mutmut runs each mutant only against the tests that executed the mutated function
(its stats pass), in a forked process; `--max-children` defaults to 1 (CPU is shared here).

Results: a table per target (killed, survived, no tests, timeout, other) and the kill rate
killed / (killed + survived + timeout + other), i.e. over the mutants that some selected test executes;
"no tests" are mutants in functions none of the target's tests call (counted, not hidden). A JSON summary
per target goes to runs/mutation/<name>.json. docs/mutation_testing.md records the measured rates and
explains each survivor that is kept (equivalent mutants).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# target -> (files to mutate, pytest selection). Selections leave out the slow end-to-end tests of a file
# (subprocesses, notebooks, torchrun) where the unit tests cover the module; see docs/mutation_testing.md.
TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "metrics": (["repro/evaluation/metrics.py"],
                ["tests/test_evaluation.py", "tests/test_mutants_evaluation.py",
                 "-k", "frechet or inception_score or feature_statistics or precision_recall"]),
    "io": (["repro/utils/io.py"],
           ["tests/test_mutants_hub_io.py", "tests/test_resume_safety.py", "tests/test_checkpoint.py"]),
    "transport": (["repro/transport/*"],
                  ["tests/test_transport.py", "tests/test_sampling.py", "tests/test_mutants_transport.py",
                   "tests/test_ddpm.py", "tests/test_denoisers.py", "-k", "not every_combination"]),
    "lightningdit": (["repro/models/lightningdit.py"],
                     ["tests/test_lightningdit.py", "tests/test_mutants_lightningdit.py",
                      "tests/test_mutants_models.py", "-k", "not test_mutants_models or lightningdit"]),
    "checkpoint": (["repro/models/checkpoint.py"],
                   ["tests/test_checkpoint.py", "tests/test_mutants_training.py", "tests/test_mutants_models.py",
                    "-k", "not test_mutants_models or checkpoint"]),
    # tests/test_benchmarks.py reaches cost.py only through subprocesses (mutmut does not see those), and the
    # in-process XL tests (test_training's FLOP count, test_env_config's batch rules) take ~25 s each: the
    # fast ones instead (test_fsdp's memory plan, the cost section of test_mutants_models.py).
    "cost": (["repro/models/cost.py"],
             ["tests/test_fsdp.py", "tests/test_mutants_models.py", "-k", "memory_plan_knows or mutants_models"]),
    # the UNet's in-process tests of test_denoisers.py (its training, step-4 and notebook runs are minutes each)
    "unet": (["repro/models/unet.py"],
             ["tests/test_denoisers.py", "tests/test_mutants_models.py",
              "-k", "unet_shapes or built_as_before or mutants_models"]),
    "denoisers": (["repro/models/denoisers.py"],
                  ["tests/test_denoisers.py", "tests/test_mutants_models.py",
                   "-k", "unet_shapes or built_as_before or flow_refuses or mutants_models"]),
    "sampling": (["repro/sampling/*"],
                 ["tests/test_sampling.py", "tests/test_inference.py", "tests/test_mutants_sampling.py", "-k",
                  "not (command_line or notebook or npz_format or torchrun or sigkill or sigterm_drops "
                  "or other_batch_size or too_big or compiled or gpu or vae_decode_precision)"]),
    "losses": (["repro/tokenizer/losses.py"],
               ["tests/test_tokenizer_losses.py", "tests/test_mutants_tokenizer.py", "-k", "not the_run_logs"]),
    # test_training.py's SIGKILL-resume and notebook tests train only in subprocesses (a step7 child, a papermill
    # kernel): mutmut's stats never tie them to step.py, so they would run in its whole-selection passes only
    # (~30 s each). Every in-process training run stays, the time-budget and torchrun ones included; lr_factor's
    # own tests live beside the tokenizer trainer that uses it. The unit tests come first: `--recheck` runs the
    # files in this order and stops at the first failure, before the ~45 s of training runs.
    "step": (["repro/training/step.py"],
             ["tests/test_mutants_training.py", "tests/test_training.py",
              "tests/test_mutants_tokenizer.py::test_warm_up_is_linear_from_the_first_step",
              "tests/test_image_reader.py::test_lr_factor_warms_up_then_decays", "-k", "not (sigkill or notebook)"]),
    "assets": (["repro/hub/assets.py"], ["tests/test_download.py", "tests/test_mutants_hub_io.py"]),
}
_PATHS = {files[0]: name for name, (files, _) in TARGETS.items()}
KILLED = ("killed", "caught by type check")
DETECTED_OR_NOT = ("killed", "survived", "timeout", "suspicious", "segfault", "caught by type check")


def checkout_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def copy_checkout(dest: Path) -> None:
    for rel in checkout_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def with_target(pyproject: str, only_mutate: list[str], selection: list[str]) -> str:
    """The checkout's pyproject.toml with its [tool.mutmut] keys for this target replaced."""
    keys = {"only_mutate": only_mutate, "pytest_add_cli_args_test_selection": selection}
    lines = pyproject.splitlines()
    start = lines.index("[tool.mutmut]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    body = [ln for ln in lines[start + 1:end] if ln.split("=")[0].strip() not in keys]
    body += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines[:start + 1] + body + lines[end:]) + "\n"


def parse_results(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\s+(\S+__mutmut_\d+): (.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def prune_pytest_temps(root: Path, stop: threading.Event, age_s: float = 900.0, every_s: float = 60.0) -> None:
    """Remove pytest's numbered tmp_path folders under `root` once they are `age_s` old, until `stop` is set.

    mutmut's forked test runs end without pytest's own clean-up (their .lock files stay, so no later session
    deletes them), and each run's tmp_path folders would stay behind: tens of GB for a target whose tests write
    checkpoints (sampling: ~20 MB a run, ~2,000 runs). A run is over long before its folder is `age_s` old."""
    while not stop.wait(every_s):
        for folder in root.glob("pytest-of-*/pytest-[0-9]*"):
            try:
                if time.time() - folder.stat().st_mtime > age_s:
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:
                pass


@contextmanager
def mutmut_copy(name: str, prefix: str, keep: bool = False):
    """(work folder, environment): a fresh copy of the checkout with the target's [tool.mutmut] keys, its tests'
    tmp_path folders pruned while it is in use; removed afterwards unless `keep`."""
    files, selection = TARGETS[name]
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-{name}-"))
    temps = work / ".pytest-tmp"  # the tests' tmp_path folders: pruned while mutmut runs, removed with `work`
    temps.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTEST_DEBUG_TEMPROOT=str(temps))
    stop = threading.Event()
    pruner = threading.Thread(target=prune_pytest_temps, args=(temps, stop), daemon=True)
    try:
        copy_checkout(work)
        pyproject = work / "pyproject.toml"
        pyproject.write_text(with_target(pyproject.read_text(), files, selection))
        pruner.start()
        yield work, env
    finally:
        stop.set()
        if keep:
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


def mutmut_run(name: str, work: Path, env: dict, max_children: int, mutants: list[str]) -> tuple[dict, float]:
    """`mutmut run` (on `mutants` only, fnmatch patterns allowed, where given) in `work`: (every mutant's status
    as `mutmut results` prints it, seconds)."""
    t0 = time.monotonic()
    run = subprocess.run(["mutmut", "run", "--max-children", str(max_children), *mutants], cwd=work, env=env,
                         capture_output=True, text=True)
    seconds = time.monotonic() - t0
    status = parse_results(subprocess.run(["mutmut", "results", "--all", "true"], cwd=work, env=env,
                                          capture_output=True, text=True).stdout)
    if run.returncode != 0 or not status:
        tail = "\n".join((run.stdout + run.stderr).splitlines()[-30:])
        raise SystemExit(f"mutmut failed for {name} (exit {run.returncode}) in {work}:\n{tail}")
    return status, seconds


def tally(status: dict, killed_unlisted: int = 0) -> dict:
    """The summary's counts from every mutant's status (`killed_unlisted`: killed mutants known by count only)."""
    counts: dict[str, int] = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    if killed_unlisted:
        counts["killed"] = counts.get("killed", 0) + killed_unlisted
    executed = sum(counts.get(s, 0) for s in DETECTED_OR_NOT)
    killed = sum(counts.get(s, 0) for s in KILLED)
    return {"counts": counts, "total": sum(counts.values()), "kill_rate": killed / executed if executed else None,
            "executed": executed, "survivors": sorted(m for m, s in status.items() if s == "survived"),
            "other": {m: s for m, s in sorted(status.items()) if s not in ("killed", "survived")}}


def survivor_diffs(work: Path, env: dict, survivors: list[str]) -> dict[str, str]:
    return {m: subprocess.run(["mutmut", "show", m], cwd=work, env=env, capture_output=True, text=True).stdout
            for m in survivors}


def write_summary(name: str, summary: dict) -> None:
    out = ROOT / "runs" / "mutation"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")


def run_target(name: str, max_children: int, show: bool, keep: bool) -> dict:
    files, selection = TARGETS[name]
    with mutmut_copy(name, "repro-mutation", keep) as (work, env):
        status, seconds = mutmut_run(name, work, env, max_children, [])
        t = tally(status)
        executed = t.pop("executed")
        summary = {"target": name, "files": files, "tests": selection, **t, "seconds": round(seconds),
                   "survivor_diffs": survivor_diffs(work, env, t["survivors"]), "status": status}
        write_summary(name, summary)
        rate = f"{100 * summary['kill_rate']:.1f}%" if executed else "n/a"
        print(f"{name}: {len(status)} mutants, " + ", ".join(f"{k} {v}" for k, v in sorted(t["counts"].items()))
              + f"; kill rate {rate} of the {executed} executed; {seconds:.0f} s; summary runs/mutation/{name}.json",
              flush=True)
        if show:
            for mutant, diff in summary["survivor_diffs"].items():
                print(f"--- survived: {mutant}\n{diff}")
        return summary


def apply_diff(source: str, diff: str) -> str | None:
    """`source` with one mutant's diff (as `mutmut show` prints it) applied, or None where it does not apply once.

    mutmut prints a method without its class indentation (but a docstring's lines as they are): the hunk is tried
    as printed, then indented by 4, then the changed lines alone (without the context), both ways."""
    body = [ln for ln in diff.splitlines()[4:] if ln[:1] in (" ", "-", "+", "")]
    changed = [ln for ln in body if ln[:1] in ("-", "+")]
    for lines in (body, changed):
        old = "\n".join(ln[1:] for ln in lines if not ln.startswith("+"))
        new = "\n".join(ln[1:] for ln in lines if not ln.startswith("-"))
        for indent in ("", "    "):
            o, n = ("\n".join(indent + ln if ln else ln for ln in text.split("\n")) for text in (old, new))
            if source.count(o) == 1:
                return source.replace(o, n)
    return None


def recheck(name: str, only: list[str]) -> None:
    """Each survivor of the last run (runs/mutation/<name>.json) written into a temp copy by hand, the target's
    tests run against it (pytest -x): for mutants mutmut cannot switch on (code run at import, e.g. a registry
    built by a factory) and to check new tests without a whole mutmut run."""
    summary = json.loads((ROOT / "runs" / "mutation" / f"{name}.json").read_text())
    selection = TARGETS[name][1]
    work = Path(tempfile.mkdtemp(prefix=f"repro-recheck-{name}-"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        copy_checkout(work)
        for mutant, diff in summary["survivor_diffs"].items():
            if only and not any(o in mutant for o in only):
                continue
            path = work / diff.splitlines()[1][4:].strip()
            source = path.read_text()
            mutated = apply_diff(source, diff)
            if mutated is None:
                print(f"{mutant}: does not apply", flush=True)
                continue
            path.write_text(mutated)
            try:
                run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection],
                                     cwd=work, env=env, capture_output=True, text=True)
            finally:
                path.write_text(source)
            last = (run.stdout.strip().splitlines() or [""])[-1]
            print(f"{mutant}: {'killed' if run.returncode else 'survived'} ({last})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def rerun(name: str, patterns: list[str], max_children: int) -> dict:
    """mutmut run again, in a fresh copy of the checkout (its current tests), on the last run's survivors and
    timeouts and on every mutant whose name matches one of `patterns` (fnmatch: the functions changed since,
    whose mutants are numbered anew). The last run's other results stand: a killed mutant stays killed when
    tests are added. runs/mutation/<name>.json gets the merged counts, and the rerun's own in "rerun"."""
    path = ROOT / "runs" / "mutation" / f"{name}.json"
    last = json.loads(path.read_text())
    killed_unlisted = last.get("killed_unlisted", 0)
    if "status" not in last:  # a summary from before "status" was kept: its killed mutants are a count only
        if patterns:  # the killed mutants of a changed function could not be taken out of the count
            raise SystemExit(f"{path} does not list its killed mutants: run the whole target again instead")
        last["status"] = {**{m: "survived" for m in last["survivors"]}, **last["other"]}
        killed_unlisted = last["counts"].get("killed", 0)
    changed = lambda m: any(fnmatch.fnmatch(m, p) for p in patterns)  # noqa: E731
    status = {m: s for m, s in last["status"].items() if not changed(m)}
    again = sorted(m for m, s in status.items() if s not in KILLED and s != "no tests") + list(patterns)
    with mutmut_copy(name, "repro-rerun") as (work, env):
        now, seconds = mutmut_run(name, work, env, max_children, again)
        ran = {m: s for m, s in now.items() if (m in status or changed(m)) and s != "not checked"}
        status.update(ran)
        t = tally(status, killed_unlisted)
        executed = t.pop("executed")
        rerun_counts = tally(ran)["counts"]
        summary = {**last, **t, "survivor_diffs": survivor_diffs(work, env, t["survivors"]), "status": status,
                   "killed_unlisted": killed_unlisted,
                   "rerun": {"patterns": patterns, "ran": len(ran), "counts": rerun_counts, "seconds": round(seconds)}}
        write_summary(name, summary)
        print(f"{name} rerun: {len(ran)} mutants run again ("
              + ", ".join(f"{k} {v}" for k, v in sorted(rerun_counts.items())) + f"), {seconds:.0f} s; now "
              + ", ".join(f"{k} {v}" for k, v in sorted(t["counts"].items()))
              + f"; kill rate {100 * summary['kill_rate']:.1f}% of the {executed} executed", flush=True)
        return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="*", help="short names or module paths (see --list)")
    parser.add_argument("--list", action="store_true", help="print the targets and their tests")
    parser.add_argument("--all", action="store_true", help="every target (hours on 2 CPU cores)")
    parser.add_argument("--max-children", type=int, default=1)
    parser.add_argument("--show", action="store_true", help="print the diff of each surviving mutant")
    parser.add_argument("--keep", action="store_true", help="keep the temp copy (mutmut browse, mutmut show)")
    parser.add_argument("--recheck", nargs="*", metavar="PART", default=None,
                        help="apply the last run's survivors (those whose name contains a PART; all without one) "
                             "by hand, one at a time, and run the target's tests: killed or survived")
    parser.add_argument("--rerun", nargs="*", metavar="PATTERN", default=None,
                        help="mutmut again on the last run's survivors and timeouts, and on the mutants matching "
                             "each PATTERN (fnmatch: functions changed since the last run)")
    args = parser.parse_args(argv)
    if shutil.which("mutmut") is None and args.recheck is None:
        print("mutmut is not installed: pip install mutmut", file=sys.stderr)
        return 2
    if args.list or not (args.targets or args.all):
        for name, (files, selection) in TARGETS.items():
            print(f"{name:13s} {' '.join(files):32s} {' '.join(selection)}")
        return 0
    names = list(TARGETS) if args.all else [_PATHS.get(t, t) for t in args.targets]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        print(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    for name in names:
        if args.recheck is not None:
            recheck(name, args.recheck)
        elif args.rerun is not None:
            rerun(name, args.rerun, args.max_children)
        else:
            run_target(name, args.max_children, args.show, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
