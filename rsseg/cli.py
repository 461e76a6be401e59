"""The ``rsseg`` command: one thin subcommand per stage.

Each command parses its options and calls one library function; all the work lives in the library so
that it is usable from Python too. Errors that rsseg raises on purpose (:class:`rsseg.errors.RssegError`)
and missing files become one line on stderr and exit status 2; nothing else is caught.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from rsseg.errors import ConfigError, RssegError
from rsseg.inference.options import PredictOptions
from rsseg.options import click_options, options_from_click
from rsseg.synth.options import SceneOptions, TianchiOptions
from rsseg.tiling.options import TileOptions
from rsseg.training.config import NodeOptions
from rsseg.vector.options import EvaluateOptions, VectorizeOptions

__all__ = ["main"]

_PATH = click.Path(path_type=Path)
_EXISTING = click.Path(exists=True, path_type=Path)


def _parse_sets(values: tuple[str, ...]) -> dict[str, str]:
    """Turn ``--set key=value`` options into a mapping (values stay strings; configs validate them)."""
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected key=value", param_hint="--set")
        out[key.strip()] = value
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rsseg")
@click.option("-v", "--verbose", count=True, help="-v: rsseg debug output; -vv: also other libraries' info.")
def cli(verbose: int) -> None:
    """Find buildings in aerial and satellite images."""
    # Dask reads its logging levels from the environment when first imported (here and in workers); its
    # task-failure reports and rasterio's echo of GDAL errors would repeat the one-line error rsseg prints.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", ("error", "warning", "info")[min(verbose, 2)])
    logging.basicConfig(level=logging.INFO if verbose > 1 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("rsseg").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        logging.getLogger("rasterio._env").setLevel(logging.CRITICAL)


# ----------------------------------------------------------------------------------------------- synth
@cli.group()
def synth() -> None:
    """Generate data for the demo, tests and benchmarks."""


@synth.command("tianchi")
@click.argument("out_dir", type=_PATH)
@click_options(TianchiOptions)
def synth_tianchi(out_dir: Path, **params: Any) -> None:
    """Write a dataset in the Tianchi competition layout to OUT_DIR."""
    from rsseg.synth.generate import make_tianchi

    info = make_tianchi(out_dir, options_from_click(TianchiOptions, params))
    click.echo(json.dumps(info, default=str))


@synth.command("scene")
@click.argument("out", type=_PATH)
@click_options(SceneOptions)
def synth_scene(out: Path, **params: Any) -> None:
    """Write a georeferenced RGB scene OUT.tif and its footprints OUT.buildings.geojson."""
    from rsseg.synth.generate import make_scene

    footprints = make_scene(out, options_from_click(SceneOptions, params))
    click.echo(json.dumps({"scene": str(out), "buildings": len(footprints)}))


# ------------------------------------------------------------------------------------ competition files
@cli.command()
@click.argument("submission", type=_EXISTING)
@click.argument("truth", type=_EXISTING)
def score(submission: Path, truth: Path) -> None:
    """Mean per-image Dice of SUBMISSION against TRUTH (the competition's metric)."""
    from rsseg.tianchi.files import score as score_files

    result = score_files(submission, truth)
    click.echo(json.dumps(result))


@cli.command()
@click.argument("submission", type=_EXISTING)
@click.argument("sample", type=_EXISTING)
def validate(submission: Path, sample: Path) -> None:
    """Check SUBMISSION against the SAMPLE submission; list every problem with its line."""
    from rsseg.tianchi.files import validate_submission

    problems = validate_submission(submission, sample)
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        raise SystemExit(1)
    click.echo(f"{submission}: valid")


# ------------------------------------------------------------------------------------------- stages
def _per_input(inputs: tuple[str, ...], out: Path, pattern: str | None, what: str, suffix: str = "",
               skip: str | None = None, shared: bool = True) -> list[tuple[str | Path, Path, str | Path | None]]:
    """(input, output, ``pattern`` filled in for it) per input named by ``inputs`` (files, folders, globs).

    One input writes ``out`` itself; several write ``out/<stem><suffix>`` each (``out`` a folder). Names
    ending in ``skip`` are left out of several; ``shared``: one file without ``{stem}`` may serve every
    input. Every input and every file a ``{stem}`` pattern names is checked here, before any cluster starts.
    """
    from rsseg.errors import ConfigError
    from rsseg.fileio import expand_paths, fill_stem, stem_of

    names = expand_paths(list(inputs))
    if skip and len(names) > 1:
        names = [n for n in names if not str(n).endswith(skip)]
    stems: dict[str, str | Path] = {}
    for name in names:
        if (first := stems.setdefault(stem_of(name), name)) is not name:
            raise ConfigError(f"{first} and {name} have the same name {stem_of(name)!r}; their outputs would "
                              "collide in one folder: name them differently or run them in separate calls")
    if pattern and len(names) > 1 and not shared and "{stem}" not in pattern:
        raise ConfigError(f"{what} {pattern}: several inputs need one file each; use a pattern with {{stem}}, "
                          "like 'DIR/{stem}.prob.tif'")
    return [(name, out if len(names) == 1 else out / f"{stem}{suffix}",
             fill_stem(pattern, stem, what) if pattern else None) for stem, name in stems.items()]


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; remove it, choose another folder or pass --overwrite")


@cli.command()
@click.argument("scenes", nargs=-1, required=True, metavar="SCENE...")
@click.argument("out_dir", type=_PATH)
@click.option("--labels", help="Footprints (GeoJSON/GPKG/Shapefile) or a label raster; a local file or a remote "
                               "name like SCENE's; with several scenes one file for all or a pattern with {stem} "
                               "(the scene's name without suffix), e.g. 'labels/{stem}.geojson'.")
@click_options(TileOptions)
@click.option("--scheduler", help="Dask scheduler address, e.g. tcp://host:8786; 'sync' runs in this process "
                                  "(default: a LocalCluster).")
def tile(scenes: tuple[str, ...], out_dir: Path, labels: str | None, scheduler: str | None,
         **params: object) -> None:
    """Cut each SCENE into chips (and label chips) with an index: under OUT_DIR, or OUT_DIR/<stem>/ when several.

    SCENE is a raster file, a folder of .tif, a glob ('data/*.tif'), or a remote raster: /vsicurl/https://...,
    s3://..., gs://..., /vsis3/... (GDAL's AWS_*/GS_*/GDAL_HTTP_* settings apply). One cluster serves all
    scenes; with several, OUT_DIR appears only when every scene is done.
    """
    from rsseg.fileio import atomic_dir
    from rsseg.pipeline.cluster import dask_executor
    from rsseg.tiling import write_chips

    options = options_from_click(TileOptions, params)
    jobs = _per_input(scenes, out_dir, labels, "--labels")
    _refuse_existing(out_dir, options.overwrite)
    with dask_executor(scheduler) as executor:
        if len(jobs) == 1:
            click.echo(f"{write_chips(jobs[0][0], out_dir, options, labels=jobs[0][2], executor=executor)}")
            return
        with atomic_dir(out_dir, overwrite=options.overwrite) as tmp:
            for scene, out, scene_labels in jobs:
                write_chips(scene, tmp / out.name, options, labels=scene_labels, executor=executor)
    for _, out, _ in jobs:
        click.echo(f"{out / 'index.csv'}")


@cli.command()
@click.argument("config", type=_EXISTING)
@click_options(NodeOptions)
@click.option("--set", "sets", multiple=True, help="Override a config value: key=value (dotted keys).")
def train(config: Path, sets: tuple[str, ...], **params: object) -> None:
    """Train a model from CONFIG.yaml (also what torchrun runs in each process of a multi-process run)."""
    from rsseg.pipeline.process import configure_process
    from rsseg.training.config import load_config
    from rsseg.training.launch import launch
    from rsseg.training.trainer import Rank

    opts = options_from_click(NodeOptions, params)
    cfg = load_config(config, _parse_sets(sets))
    # each torchrun rank on this host takes its share of the cores
    configure_process(threads=cfg.run.threads, tasks=int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or None)
    rank = Rank.from_env().rank
    if rank:  # a torchrun process other than rank 0: warnings only, rank 0 reports
        logging.getLogger("rsseg").setLevel(logging.WARNING)
    best = launch(cfg, opts)
    if not rank:
        click.echo(str(best))


#: Arguments after the first that are further checkpoints, not inputs: ``rsseg predict a.pt b.pt IN OUT``.
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".json")


def _checkpoints_and_inputs(first: Path, rest: tuple[str, ...]) -> tuple[Path | list[Path], tuple[str, ...]]:
    """Split ``rsseg predict``'s CHECKPOINT... INPUT... arguments.

    The first argument and those right after it with a checkpoint suffix (.pt, .pth, .ckpt, an ensemble's
    .json) are checkpoints (one: a path, several: a list), the rest inputs.
    """
    count = next((i for i, arg in enumerate(rest) if Path(arg).suffix.lower() not in _CHECKPOINT_SUFFIXES),
                 len(rest))
    if count == len(rest):
        raise ConfigError(f"{rest[-1]} has a checkpoint name but is the last argument before OUTPUT; expected "
                          "CHECKPOINT... INPUT... OUTPUT")
    checkpoints = [first, *map(Path, rest[:count])]
    return checkpoints if count else first, rest[count:]


@cli.command()
@click.argument("checkpoint", type=_PATH, metavar="CHECKPOINT...")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.argument("output", type=_PATH)
@click.option("--tile", "--window", "window", type=int, default=PredictOptions.model_fields["window"].default,
              show_default=True, help=PredictOptions.model_fields["window"].description)
@click_options(PredictOptions, exclude=("window",))
@click.option("--sample", type=_EXISTING, help="Sample submission giving the order of rows (JPG folder input).")
def predict(checkpoint: Path, inputs: tuple[str, ...], output: Path, sample: Path | None, **params: object) -> None:
    """Predict a raster, several rasters, a folder of Tianchi JPGs or a folder of images.

    CHECKPOINT... is one checkpoint, several (an ensemble: probabilities averaged over them and the TTA views;
    the threshold is their mean, min_pixels the smallest) or an ensemble file (ensemble.json, with the
    threshold and min_pixels tuned for it); checkpoints after the first need a .pt, .pth, .ckpt or .json name.

    \b
    One INPUT:
      a raster (local, or /vsicurl/https://..., s3://..., gs://..., /vsis3/...): OUTPUT is the mask COG
        (and OUTPUT.prob.tif with --output-kind both);
      a folder with OUTPUT *.csv or --sample: a Tianchi submission of its JPGs;
      a folder of georeferenced GeoTIFFs only: scenes, as for several INPUTs below;
      another folder: a folder OUTPUT of masks, one per image (PNG/JPG/TIFF; a georeferenced TIFF gets
        <stem>.tif on its own grid, others <stem>.png).

    Several INPUTs or a glob ('scenes/*.tif'; folders among several give their .tif/.tiff): the scenes are
    predicted with one model load into the folder OUTPUT, <stem>.tif (+ <stem>.prob.tif) each; OUTPUT
    appears only when all are written.
    """  # noqa: D301 (\b: click keeps the paragraph's line breaks)
    from rsseg.fileio import is_remote

    options = options_from_click(PredictOptions, params)
    checkpoint, inputs = _checkpoints_and_inputs(checkpoint, inputs)
    if len(inputs) == 1 and (is_remote(inputs[0]) or not any(c in inputs[0] for c in "*?[")):
        from rsseg.inference.predict import predict_path

        result = predict_path(checkpoint, inputs[0], output, options, sample=sample)
    else:
        if sample is not None or output.suffix.lower() == ".csv":
            raise ConfigError("a Tianchi submission reads one folder of JPGs; several INPUTs or a glob write a "
                              "folder of masks: give one folder, or an OUTPUT folder without --sample")
        from rsseg.inference.scenes import predict_rasters

        result = predict_rasters(checkpoint, inputs, output, options)
    click.echo(str(result))


@cli.command()
@click.argument("masks", nargs=-1, required=True, metavar="MASK...")
@click.argument("out", type=_PATH)
@click.option("--prob", help="Probability raster for a mean-confidence attribute; with several masks a pattern "
                             "with {stem} (the mask's name without suffix), e.g. 'pred/{stem}.prob.tif'.")
@click.option("--format", "fmt", type=click.Choice(["geojson", "gpkg", "fgb", "parquet"]), default="gpkg",
              show_default=True, help="Format of OUT/<stem>.<format> when several masks are given.")
@click_options(VectorizeOptions)
@click.option("--scheduler", help="Dask scheduler address, or 'sync' to run in this process (default: a "
              "LocalCluster; masks of a single block each run in this process).")
def vectorize(masks: tuple[str, ...], out: Path, prob: str | None, fmt: str, scheduler: str | None,
              **params: Any) -> None:
    """Turn building mask GeoTIFFs into polygons: OUT.geojson, OUT.gpkg, OUT.fgb or OUT.parquet.

    MASK is a file, a folder (its .tif, less *.prob.tif) or a glob; with several, OUT is a folder of
    <stem>.<format> files that appears only when all are written. GeoJSON is written in EPSG:4326;
    GeoPackage, FlatGeobuf and GeoParquet (1.1) keep the mask's CRS.
    """
    from rsseg.fileio import atomic_dir
    from rsseg.pipeline.cluster import dask_executor
    from rsseg.vector import block_count, vectorize_to_file
    from rsseg.vector.files import check_output

    options = options_from_click(VectorizeOptions, params)
    jobs = _per_input(masks, out, prob, "--prob", suffix=f".{fmt}", skip=".prob.tif", shared=False)
    if len(jobs) > 1:
        _refuse_existing(out, options.overwrite)
    for _, target, _ in jobs:  # refuse before starting any cluster
        check_output(target, options.overwrite or len(jobs) > 1)
    if scheduler is None and all(block_count(mask, options) == 1 for mask, _, _ in jobs):
        scheduler = "sync"
    with dask_executor(scheduler) as executor:
        if len(jobs) == 1:
            n = vectorize_to_file(jobs[0][0], out, options, prob=jobs[0][2], executor=executor)
            click.echo(json.dumps({"output": str(out), "buildings": n}))
            return
        with atomic_dir(out, overwrite=options.overwrite) as tmp:
            counts = {target.stem: vectorize_to_file(mask, tmp / target.name, options, prob=mask_prob,
                                                     executor=executor) for mask, target, mask_prob in jobs}
    click.echo(json.dumps({"output": str(out), "buildings": sum(counts.values()), "per_mask": counts}))


@cli.command()
@click.argument("pred", type=_EXISTING)
@click.argument("truth", type=_EXISTING)
@click_options(EvaluateOptions)
def evaluate(pred: Path, truth: Path, **params: Any) -> None:
    """Object-level precision/recall/F1 (SpaceNet rule) and area IoU of PRED against TRUTH vectors.

    With --min-area, polygons under that many m2 are left out on both sides first (SpaceNet-2 leaves out
    buildings under 20 pixels); the JSON names the rule and how many polygons each side lost to it.
    """
    from rsseg.vector import evaluate_vectors

    click.echo(json.dumps(evaluate_vectors(pred, truth, options_from_click(EvaluateOptions, params))))


# ---------------------------------------------------------------------------------------- pipelines
@cli.command()
@click.argument("pipeline_file", metavar="PIPELINE")
@click.option("--scheduler", help="Dask scheduler address, e.g. tcp://host:8786 (default: a LocalCluster).")
@click.option("--workdir", type=_PATH, help="Work directory (default: from the pipeline file).")
@click.option("--set", "sets", multiple=True, help="Override a pipeline value: key=value (dotted keys).")
@click.option("--no-resume", is_flag=True, help="Re-run every stage even if its manifest matches.")
def run(pipeline_file: str, scheduler: str | None, workdir: Path | None, sets: tuple[str, ...],
        no_resume: bool) -> None:
    """Run a pipeline on Dask: a YAML file or a shipped one's name (demo, scenes_to_buildings, ...)."""
    from rsseg.pipeline.runner import load_pipeline
    from rsseg.pipeline.runner import run as run_pipeline

    pipe = load_pipeline(pipeline_file, overrides=_parse_sets(sets), workdir=workdir)
    summary = run_pipeline(pipe, scheduler=scheduler, resume=not no_resume,
                           on_start=lambda link: click.echo(f"rsseg run {pipe.name}: Dask dashboard at {link}"))
    click.echo(json.dumps(summary, default=str, indent=2))


@cli.command()
@click.option("--workdir", type=_PATH, default=Path("demo-run"), show_default=True)
@click.option("--scheduler", help="Dask scheduler address (default: a LocalCluster).")
def demo(workdir: Path, scheduler: str | None) -> None:
    """Run the whole pipeline end to end on generated data."""
    from rsseg.pipeline.runner import run_demo

    summary = run_demo(workdir, scheduler=scheduler,
                       on_start=lambda link: click.echo(f"rsseg demo: Dask dashboard at {link}"))
    click.echo(json.dumps(summary, default=str, indent=2))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``rsseg`` console script: sets up the process, then runs the command.

    The process settings (allocator, threads sized to the cores this process has, passive OpenMP waiting,
    GDAL cache: :func:`rsseg.pipeline.process.configure_process`) are applied here, before a command imports
    torch, and never by the library functions the commands call.
    """
    from rsseg.pipeline.process import configure_process

    configure_process()
    try:
        cli.main(args=argv, prog_name="rsseg", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("rsseg: aborted", err=True)
        raise SystemExit(130) from None
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except (RssegError, FileNotFoundError, FileExistsError) as exc:
        click.echo(f"rsseg: error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
