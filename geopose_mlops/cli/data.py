"""``synth``, ``data check`` and ``folds``: the data set before anything is trained."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from geopose_mlops.cli.app import main
from geopose_mlops.config import TrainConfig, default_of
from geopose_mlops.errors import ConfigError


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--images-per-city", type=click.IntRange(min=0), required=True, help="Training images per city.")
@click.option("--size", type=click.IntRange(min=8), required=True, help="Image side, pixels.")
@click.option("--seed", type=int, required=True, help="Same seed, same bytes.")
@click.option("--cities", default="ARG,ATL,JAX,OMA", show_default=True, help="Comma-separated cities.")
@click.option("--test-images-per-city", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--rgb-format", type=click.Choice(["j2k", "tif"]), default="j2k", show_default=True)
def synth(
    out: Path, images_per_city: int, size: int, seed: int, cities: str, test_images_per_city: int, rgb_format: str
) -> None:
    """Write a synthetic data set in the competition's layout (test truth goes to OUT/test_truth)."""
    from geopose_mlops.constants import CITIES
    from geopose_mlops.data.synth import make_synthetic_dataset

    chosen = [c.strip() for c in cities.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CITIES]
    if unknown or not chosen:
        raise ConfigError(f"--cities {cities!r}: expected a comma-separated subset of {','.join(CITIES)}")
    ids = make_synthetic_dataset(
        out, images_per_city, size, seed, chosen, test_images_per_city, rgb_format, progress=True
    )
    click.echo(f"wrote {len(ids)} images to {out}")


@main.group()
def data() -> None:
    """Inspect a data set."""


@data.command("check")
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.option("--headers-only", is_flag=True, help="Read raster headers only (fast; misses truncated pixels).")
@click.option("--workers", type=click.IntRange(0), help="Decoding processes (default or 0: the usable cores).")
def data_check(data_dir: Path, headers_only: bool, workers: int | None) -> None:
    """Validate DATA: counts per city and every bad file with its reason; exit 1 if any."""
    from geopose_mlops.data.check import check_dataset

    report = check_dataset(data_dir, decode=not headers_only, progress=True, workers=workers or None)
    for split, counts in report.counts.items():
        listed = "  ".join(f"{city} {n}" for city, n in counts.items())
        click.echo(f"{split}: {sum(counts.values())} images  ({listed})")
    for path, reason in report.problems:
        click.echo(f"BAD {path}: {reason}")
    if not report.ok:
        click.echo(f"{len(report.problems)} problem(s) in {data_dir}", err=True)
        sys.exit(1)
    click.echo("ok")


@main.command()
@click.argument("data_dir", metavar="DATA", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--k", type=click.IntRange(min=2), default=default_of(TrainConfig, "k"), show_default=True, help="Number of folds."
)
@click.option("--seed", type=int, default=default_of(TrainConfig, "seed"), show_default=True, help="Fold seed.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Default: DATA/folds.csv.")
def folds(data_dir: Path, k: int, seed: int, out: Path | None) -> None:
    """Write folds.csv (id,city,fold): k folds stratified by city."""
    from geopose_mlops.constants import FOLDS_CSV
    from geopose_mlops.data.folds import make_folds, write_folds
    from geopose_mlops.data.layout import find_samples

    rows = make_folds(find_samples(data_dir, "train"), k, seed)
    target = out or data_dir / FOLDS_CSV
    write_folds(target, rows)
    click.echo(f"wrote {len(rows)} rows in {k} folds to {target}")
