"""Regenerates the config-keys table of docs/cli.md, configs/demo.yaml and configs/tool-demo.yaml from rlhf_cli.config.

    python scripts/gen_config_docs.py      # from the repository root, after changing a config section

tests/test_configs_dir.py checks both against the code (every key has a row showing its default;
demo.yaml loads to exactly the defaults); tests/test_cli_tool_demo.py checks that tool-demo.yaml
loads to the config of ``--data tool-demo`` (rlhf_cli.tool_demo_preset).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from rlhf_cli.config import RunConfig, all_keys, field_help, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| key | type | default | meaning |"


def keys_table() -> str:
    rows = [HEADER, "|---|---|---|---|"]
    for key, (typ, default, doc) in all_keys().items():
        rows.append(f"| `{key}` | {typ.__name__} | `{default!r}` | {doc} |")
    return "\n".join(rows)


def _yaml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return "''" if v == "" else yaml.safe_dump(v).strip().removesuffix("...").strip()
    return repr(v)


def demo_yaml_body() -> str:
    """Every section and key of RunConfig with its default and its help as a comment."""
    cfg, docs, out = RunConfig(), field_help(RunConfig), []
    for f in dataclasses.fields(RunConfig):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out += ["", f"{f.name}:"]
            section_docs = field_help(type(v))
            for g in dataclasses.fields(v):
                if g.metadata.get("dynamic"):
                    continue  # algo.<field>: documented by `rlhf algos show`
                out.append(f"  {g.name}: {_yaml_value(getattr(v, g.name))}  # {section_docs.get(g.name, '')}")
        else:
            out.append(f"{f.name}: {_yaml_value(v)}  # {docs.get(f.name, '')}")
    return "\n".join(out).lstrip("\n") + "\n"


def main() -> None:
    cli = ROOT / "docs" / "cli.md"
    text = cli.read_text()
    start = text.index(HEADER)
    end = text.index("\n\n", start)
    cli.write_text(text[:start] + keys_table() + text[end:])
    demo = ROOT / "configs" / "demo.yaml"
    text = demo.read_text()
    demo.write_text(text[: text.index("out:")] + demo_yaml_body())  # the comment header stays
    tool = ROOT / "configs" / "tool-demo.yaml"
    header = tool.read_text().split("\n\n", 1)[0] + "\n\n" if tool.is_file() else "# The tool demo.\n\n"
    tool.write_text(header + to_yaml(load_config(None, [], **{"data.sources": "tool-demo"})))  # the header stays


if __name__ == "__main__":
    main()
