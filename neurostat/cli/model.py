"""Model commands: ``ablate`` and ``prune``."""

from __future__ import annotations

from pathlib import Path

import click

from ..choices import PRUNE_CRITERIA, PRUNE_SCOPES
from .app import allow_other_model, demo_model_name, main, user_errors


@main.command()
@click.option(
    "--model", required=True, callback=demo_model_name, help="Hub id, local directory or `demo` of the model to edit."
)
@click.option(
    "--neurons",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Neurons to remove: JSON {layer: [indices]} (e.g. from `neurostat select`).",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Edited checkpoint directory."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (never the source model's folder).")
@allow_other_model
@user_errors
def ablate(model, neurons, out, overwrite, allow_other_model) -> None:
    """Write an edited checkpoint whose given neurons are removed (zeroed W2 columns)."""
    from ..model.edit import ablate_checkpoint

    chosen, copied = ablate_checkpoint(model, neurons, out, overwrite, allow_other_model)
    if not copied:
        click.echo(f"note: {model} has no feature-extractor config to copy", err=True)
    click.echo(f"zeroed {len(chosen)} neurons in {sum(1 for c in chosen.counts().values() if c)} layers -> {out}")


@main.command()
@click.option(
    "--model", required=True, callback=demo_model_name, help="Hub id, local directory or `demo` of the model to prune."
)
@click.option(
    "--protect",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Neurons never pruned (repeatable; e.g. property neurons from `neurostat select`).",
)
@click.option(
    "--keep-ratio",
    "ratio",
    type=float,
    default=None,
    help="Fraction of each layer's neurons to keep (or of all, with --scope global).",
)
@click.option("--keep", type=int, default=None, help="Neurons to keep per layer (or in all, with --scope global).")
@click.option("--keep-protected-only", is_flag=True, help="Keep exactly the protected neurons.")
@click.option("--scope", type=click.Choice(PRUNE_SCOPES), default="layer", help="Budget per layer or across layers.")
@click.option(
    "--criterion",
    type=click.Choice(PRUNE_CRITERIA),
    default="l1",
    help="Score: ‖W1[j,:]‖ + |b1[j]| + ‖W2[:,j]‖; lowest pruned first.",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Pruned checkpoint directory."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (never the source model's folder).")
@allow_other_model
@user_errors
def prune(model, out, **options) -> None:
    """Prune FFN neurons physically and save a checkpoint that `neurostat.load_pruned` reads back."""
    from ..model.pruning import prune_checkpoint

    result = prune_checkpoint(model, out, **options)
    click.echo(
        f"parameters: {result.params_before:,} -> {result.params_after:,} "
        f"({100 * (1 - result.params_after / result.params_before):.1f}% fewer)"
    )
    click.echo("FFN widths per layer: " + " ".join(f"{layer}:{w}" for layer, w in result.widths().items()))
    click.echo(f"pruned checkpoint: {out} (load with neurostat.load_pruned)")
