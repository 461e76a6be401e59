"""Options defined once: the same model gives the library's defaults, the click options and the YAML checks."""

from pathlib import Path
from typing import Literal

import click
import pytest
from click.testing import CliRunner
from pydantic import Field

from rsseg.errors import ConfigError
from rsseg.options import Options, click_options, options_from_click, resolve


class Demo(Options):
    size: int = Field(512, description="Window size in pixels.")
    max_nodata: float = 0.5
    mode: Literal["none", "flip", "d4"] = "d4"
    bands: list[int] | None = None
    overwrite: bool = False
    out: Path | None = None


@click.command()
@click_options(Demo)
def demo_cmd(**params):
    opts = options_from_click(Demo, params)
    click.echo(opts.model_dump_json())


def test_resolve_defaults_options_and_keywords():
    assert resolve(Demo) == Demo()
    assert resolve(Demo, values={"size": 256}).size == 256
    base = Demo(mode="flip")
    merged = resolve(Demo, base, {"size": 128})
    assert (merged.mode, merged.size, merged.max_nodata) == ("flip", 128, 0.5)


def test_resolve_names_the_bad_field():
    with pytest.raises(ConfigError, match=r"siez.*valid names: size, max_nodata"):
        resolve(Demo, values={"siez": 3})
    with pytest.raises(ConfigError, match="mode"):
        resolve(Demo, values={"mode": "d8"})


def test_click_options_follow_the_model():
    runner = CliRunner()
    out = runner.invoke(demo_cmd, [])
    assert out.exit_code == 0, out.output
    assert Demo.model_validate_json(out.output) == Demo()
    out = runner.invoke(demo_cmd, ["--size", "256", "--max-nodata", "0.1", "--mode", "flip", "--bands", "3,2,1",
                                   "--overwrite", "--out", "x.tif"])
    assert out.exit_code == 0, out.output
    assert Demo.model_validate_json(out.output) == Demo(size=256, max_nodata=0.1, mode="flip", bands=[3, 2, 1],
                                                          overwrite=True, out=Path("x.tif"))
    bad = runner.invoke(demo_cmd, ["--mode", "d8"])
    assert bad.exit_code == 2 and "d8" in bad.output
    bad = runner.invoke(demo_cmd, ["--bands", "1,x"])
    assert bad.exit_code == 2 and "comma-separated" in bad.output
    help_text = runner.invoke(demo_cmd, ["--help"]).output
    assert "Window size in pixels." in help_text and "[default: 512]" in help_text
