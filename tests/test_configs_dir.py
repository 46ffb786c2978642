"""Every shipped config in configs/ loads, and configs/demo.yaml spells out exactly the defaults
(regenerate demo.yaml and the keys table of docs/cli.md with scripts/gen_config_docs.py)."""

from pathlib import Path

import pytest
from rlhf_cli.config import RunConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, RunConfig)
    assert path.read_text().startswith("#"), f"{path.name} must start with a header comment"


def test_demo_yaml_is_the_defaults():
    assert load_config(str(CONFIGS / "demo.yaml")) == RunConfig()


def test_every_config_key_is_documented_with_its_default():
    from rlhf_cli.config import all_keys

    text = (CONFIGS.parent / "docs" / "cli.md").read_text()
    for key, (_type, default, _doc) in all_keys().items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"docs/cli.md has no row for config key {key!r}"
        shown = repr(default) if isinstance(default, str) else str(default).lower() if isinstance(default, bool) else (
            str(default))
        assert f"`{shown}`" in row or f"`{default}`" in row, f"docs/cli.md row for {key!r} does not show default {default!r}"
