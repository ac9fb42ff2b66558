"""Every step ends by printing what it wrote (issue 22): its last line is `wrote: a, b, c`, naming files that
exist. The cheap steps on the tiny preset, in this process, as their command lines run them."""

from __future__ import annotations

from pathlib import Path

from repro.utils.io import wrote_line
from steps import step1_install, step3_configs, step4_inference, step5_fix_stats


def written(out: str) -> list[Path]:
    """The paths the last line names (each item's text before a ` (...)` note); asserts the line's shape."""
    last = out.strip().splitlines()[-1]
    assert last.startswith("wrote: "), f"the last line is not a wrote: line: {last!r}"
    items = [item.split(" (")[0].rstrip("/") for item in last[len("wrote: "):].split(", ")]
    return [Path(item) for item in items]


def test_wrote_line_names_what_was_written_or_nothing():
    assert wrote_line(["a.json", None, "", Path("b/c.pt")]) == "wrote: a.json, b/c.pt"
    assert wrote_line([]) == "wrote: nothing"


def test_steps_1_3_4_5_end_with_a_wrote_line_naming_existing_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the tiny preset's weights are kit-local: nothing is fetched
    runs = tmp_path / "runs"
    monkeypatch.setenv("REPRO_RUNS_DIR", str(runs))

    step1_install.cli(["--dry-run"])
    assert written(capsys.readouterr().out) == [runs / "env.json"]
    assert (runs / "env.json").is_file()

    step3_configs.cli(["--config", "tiny"])
    resolved = runs / "configs" / "tiny.resolved.yaml"
    assert written(capsys.readouterr().out) == [resolved]
    assert resolved.is_file()

    step4_inference.cli(["--config", "tiny", "--num-samples", "4", "--out", str(tmp_path / "samples"),
                         "--no-progress"])
    paths = written(capsys.readouterr().out)
    assert paths and all(p.exists() for p in paths), paths
    assert tmp_path / "samples" / "samples.npz" in paths

    step5_fix_stats.cli(["--config", str(resolved)])  # only checks: writes nothing, says which file it checked
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("wrote: nothing (checked ") and Path(last[len("wrote: nothing (checked "):-1]).is_file()


def test_step3_dry_run_says_it_wrote_nothing(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    step3_configs.cli(["--config", "tiny", "--dry-run"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == "wrote: nothing (--dry-run)"
