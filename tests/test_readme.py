"""The README is a user's guide: short, its links resolve, and its own-data recipe plans exactly
the jobs it names (a real `snakemake -n` on an ImageNet-layout folder)."""
from __future__ import annotations

import re

import yaml

from workflow import ROOT, snakemake

README = (ROOT / "README.md").read_text()


def test_the_readme_is_at_most_300_lines():
    assert len(README.splitlines()) <= 300


def test_every_local_link_and_anchor_resolves():
    page = (ROOT / "docs" / "results.md").read_text()
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', page))
    links = re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", README)
    assert links
    for target, anchor in links:
        if target.startswith("http"):
            continue
        assert (ROOT / target).exists(), target
        if anchor:
            assert target == "docs/results.md" and anchor in anchors, f"{target}#{anchor}"


def _own_data_recipe() -> tuple[dict, set[str]]:
    """The YAML block under '# my.yaml' and the rules the sentence 'This runs, and only this:' names."""
    block = re.search(r"```yaml\n# my\.yaml\n(.*?)```", README, re.S)
    assert block, "the README's own-data recipe (a yaml block starting '# my.yaml') is missing"
    named = re.search(r"This runs, and only this:(.*?)\n\n", README, re.S)
    assert named, "the README does not say which jobs the own-data recipe runs"
    return yaml.safe_load(block.group(1)), set(re.findall(r"`([a-z_]+)`", named.group(1)))


def test_the_own_data_recipe_plans_exactly_the_jobs_the_readme_names(tmp_path):
    cfg, named = _own_data_recipe()
    data = tmp_path / "imagenet"
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            (data / split / cls).mkdir(parents=True)
    cfg["dataset"]["source"] = str(data)
    workdir = tmp_path / "run"
    workdir.mkdir()
    r = snakemake(workdir, "-n", config=cfg)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stats = r.stdout.split("Job stats:")[1].split("total")[0]
    planned = {line.split()[0] for line in stats.splitlines()[3:] if line.strip()}
    assert planned - {"all"} == named
    res = len(cfg["resolutions"])
    counts = {line.split()[0]: int(line.split()[1]) for line in stats.splitlines()[3:] if line.strip()}
    assert counts["train_model"] == res and counts["shard_images"] == 2 * res
