"""Step 11: export a model to share: its EMA weights as safetensors (no pickle), the resolved config, the latent
statistics, the tokenizer (or the step-2 asset that provides it), an index of sha256s and a model card with
what it was trained on, for how many steps, and step 8's metrics when they were measured (metrics.json in
the run folder). --push-to-hub uploads the folder with huggingface_hub (HF_TOKEN or `hf auth login`).

    python -m steps.step11_export --from runs/output/own_data --out runs/exports/own_data
    python -m steps.step11_export --from runs/output/own_data --out runs/exports/own_data --push-to-hub me/my-dit
    python -m steps.step11_export --from tiny --out tiny_export
    # notebook:  from steps.step11_export import main; res = main(source="runs/output/own_data", out="export")
    # Python:    from repro import Pipeline; Pipeline.from_pretrained("runs/output/own_data").export("export")

--from takes what `repro.Pipeline.from_pretrained` takes: a run folder of step 7 (its newest checkpoint), a
preset or YAML config, an exported folder or a Hub repo id. Load the result with
`Pipeline.from_pretrained(OUT or REPO_ID)`.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from repro.utils.cli import run_cli, step_parser


def main(source: str, out: Optional[str] = None, push_to_hub: Optional[str] = None, private: Optional[bool] = None,
         set: Optional[list[str]] = None, include_vae: bool = False, device: Optional[str] = None) -> dict:
    """Returns {'folder', 'files', 'url' (when pushed), 'summary'}."""
    from repro.api import Pipeline
    from repro.errors import ConfigError
    from repro.hub.export import read_index
    from repro.hub.share import push_folder
    from repro.paths import runs_dir, runs_path
    from repro.utils.io import wrote_line

    if out is None and push_to_hub is None:
        raise ConfigError("pass --out DIR (the folder to write), --push-to-hub OWNER/NAME, or both")
    pipe = Pipeline.from_pretrained(str(runs_path(source)) if source.startswith("runs:") else source, set=set,
                                    device=device or "cpu")
    folder = runs_path(out) if out else runs_dir() / "exports" / push_to_hub.replace("/", "--")
    folder = pipe.export(folder, include_vae=include_vae or None, repo_id=push_to_hub)
    files = sorted(read_index(folder)["files"])
    result = {"folder": str(folder), "files": files, "url": None}
    if push_to_hub:
        result["url"] = push_folder(folder, push_to_hub, private=private)
    result["summary"] = (f"exported {pipe.config.model.model_type} (step {pipe.step}) to {folder}: {', '.join(files)}"
                         + (f"; pushed to {result['url']}" if result["url"] else ""))
    print(result["summary"], flush=True)
    print(wrote_line([folder]) + f" ({len(files)} files)", flush=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = step_parser("python -m steps.step11_export", __doc__)
    p.add_argument("--from", dest="source", required=True,
                   help="run folder of step 7, preset, YAML config, exported folder or Hub repo id")
    p.add_argument("--out", help="the folder to write (default with --push-to-hub: runs/exports/OWNER--NAME)")
    p.add_argument("--push-to-hub", metavar="OWNER/NAME", help="upload the folder to this Hugging Face model repo")
    p.add_argument("--private", action="store_true", default=None, help="create the repo private")
    p.add_argument("--include-vae", action="store_true",
                   help="copy the tokenizer even when it is step 2's official download (referenced by name otherwise)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides (e.g. sample.cfg_scale=4.0: the sampling defaults the export carries)")
    p.add_argument("--device", help="where the model is loaded to check it (default cpu)")
    return p


def cli(argv: Optional[Sequence[str]] = None) -> dict:
    a = build_parser().parse_args(argv)
    return run_cli(lambda: main(a.source, a.out, a.push_to_hub, a.private, a.set, a.include_vae, a.device))


if __name__ == "__main__":
    cli()
