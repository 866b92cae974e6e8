"""The README's team deploy.yml (staging + production, web + worker, a deploy user) is valid."""

from __future__ import annotations

import re
from pathlib import Path

from fabdeploy.adapters import nodectl
from fabdeploy.basics import config

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_team_deploy_yml_loads_for_each_stage(tmp_path: Path) -> None:
    text = README.read_text()
    start = text.index("A team's deploy.yml")
    block = re.search(r"```yaml\n(.*?)```", text[start:], re.S)
    assert block is not None
    (tmp_path / "deploy.yml").write_text(block.group(1))
    (tmp_path / "deploy.yml").chmod(0o644)
    fleets = {}
    for stage in ("staging", "production"):
        cfg = config.load(tmp_path / "deploy.yml", stage=stage)
        assert cfg.run_as == "deploy" and cfg.ssh.sudo and cfg.s3.prefix == f"shop/{stage}"
        fleets[stage] = {h.name: h.roles for h in cfg.hosts}
        worker = next(h for h in cfg.hosts if h.roles == ("worker",))
        assert config.for_host(cfg, worker).restart == "/usr/bin/systemctl restart shop-worker"
        assert "NOPASSWD: FABDEPLOY_SHOP" in nodectl.sudoers(cfg)
    assert fleets == {
        "staging": {"stage-web1": ("web",), "stage-work1": ("worker",)},
        "production": {"web1": ("web",), "web2": ("web",), "work1": ("worker",)},
    }
