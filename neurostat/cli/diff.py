"""Comparison command: ``diff``."""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from .app import main, user_errors


@main.command()
@click.argument("a", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("b", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--property",
    "properties",
    multiple=True,
    help="Property to compare (repeatable): phone-type, gender, pitch, phone or a label set of the stores "
    "[default: the paper's properties the stores have labels for].",
)
@click.option("--sigma", default=0.8, help="σ of the paper's selection rule, in both stores.")
@click.option("--alpha", default=0.05, help="False discovery rate of the Benjamini-Hochberg correction.")
@click.option(
    "--by",
    default=None,
    help="Label parts of the tested cells, comma-separated (e.g. gender,phone) [default: all, the joint label].",
)
@click.option("--top", default=50, help="How many of the most significant cells the JSON and the page list.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the page (index.html, one PNG per property) and diff.json.",
)
@user_errors
def diff(a, b, properties, sigma, alpha, by, top, out) -> None:
    """What changed from store A to store B (same corpus; label parts only one store counts are summed out):
    property neurons gained, lost and kept per layer, and each (layer, label, neuron) cell's change of
    P(j | label) by a two-proportion z-test, Benjamini-Hochberg corrected over all tested cells.

    A diff measures activations. `neurostat ablate` zeroes the neurons' output weights, so ablated neurons
    still fire: in a diff of an ablated model they stay (mostly "kept"), and the change shows in what the
    layers after them compute."""
    from ..diff import diff_stores

    parts = tuple(p.strip() for p in by.split(",")) if by else ()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the record lists them; echoed once below
        result = diff_stores(a, b, out, tuple(properties), sigma, alpha, parts, top)
    for note in result.warnings:
        click.echo(f"warning: {note}", err=True)
    click.echo(result.describe())
    if out is not None:
        click.echo(f"wrote index.html, {len(result.properties)} figures and diff.json to {out}")
