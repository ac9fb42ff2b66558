"""Step 1: environment doctor. Report the machine, install only what is missing, never touch torch.

    python -m steps.step1_install --dry-run            # report + install plan, installs nothing
    python -m steps.step1_install                      # report + pip install what is missing/out of range
    python -m steps.step1_install --requirements requirements.txt --out runs
    # notebook:  from steps.step1_install import main; report = main(dry_run=True)

Writes `runs/env.json` (or `<out>/env.json`), which step 3 reads to pick precision and batch sizes.
A `vfm-vae` line per kind of GPU (a T4 and an H100 for reference on a CPU machine) gives the VFM-VAE's
largest encode and decode batch from its computed memory budget (repro.tokenizer.vfm_vae_budget).
A GPU the installed torch has no kernels for (e.g. a P100, sm_60) is an error with the fix.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from repro import resources
from repro.setup import envinfo, install_plan
from repro.errors import ReproError
from repro.hub.client import HubClientError, check_client_version
from repro.utils.cli import run_cli, step_parser
from repro.utils.io import wrote_line

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main(dry_run: bool = False, requirements: str = "requirements.txt", install: bool = True,
         out: Optional[str] = None, pip_args: Sequence[str] = (), fail_on_problems: bool = True) -> dict:
    """Report, plan (and unless dry_run, run) the installs, write env.json; returns the report."""
    report = envinfo.collect_env(outputs_dir=out)
    print(envinfo.format_report(report), flush=True)
    if install:
        req = Path(requirements)
        if not req.is_file() and not req.is_absolute() and (PROJECT_ROOT / req).is_file():
            req = PROJECT_ROOT / req  # a notebook started in notebooks/ still finds the kit's requirements.txt
        source = req
        if not req.is_file() and requirements == "requirements.txt":
            source = resources.installed_requirements()  # a pip-installed kit ships no requirements.txt
        items = install_plan.plan_installs(install_plan.parse_requirements(source))
        print(install_plan.format_plan(items), flush=True)
        installed = [] if dry_run else install_plan.execute_plan(items, pip_args=pip_args)
        report["install"] = {"requirements": str(req) if source is req else "the installed kit's metadata",
                             "dry_run": dry_run, "installed": installed,
                             "plan": [{"name": i.name, "spec": str(i.requirement), "installed": i.installed,
                                       "action": i.action, "reason": i.reason} for i in items],
                             "warnings": install_plan.warnings_of(items)}
    try:  # after the installs: the plan may just have brought huggingface_hub in range
        report["huggingface_hub"] = check_client_version()
        print(f"huggingface_hub {report['huggingface_hub']}: ok (any release from the kit's lower bound on)", flush=True)
    except HubClientError as err:
        report["problems"].append(str(err))
    env_path = envinfo.write_env_json(report, Path(out) / "env.json" if out else None)
    print(wrote_line([env_path]), flush=True)
    if report["problems"] and fail_on_problems:
        raise ReproError(" | ".join(report["problems"]))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = step_parser("python -m steps.step1_install", __doc__)
    p.add_argument("--dry-run", action="store_true", help="print the install plan, install nothing")
    p.add_argument("--requirements", default="requirements.txt", help="requirements file to check")
    p.add_argument("--no-install", action="store_true", help="report only, skip the install plan")
    p.add_argument("--out", default=None, help="runs folder for env.json (default: $REPRO_RUNS_DIR or ./runs)")
    p.add_argument("--pip-arg", action="append", default=[], help="extra argument for pip (repeatable)")
    return p


def cli(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    run_cli(lambda: main(dry_run=args.dry_run, requirements=args.requirements, install=not args.no_install,
                         out=args.out, pip_args=args.pip_arg))


if __name__ == "__main__":
    cli()
