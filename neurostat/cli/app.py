"""The click group and the one place that turns the library's user errors into command-line errors."""

from __future__ import annotations

import errno
import functools
import logging
import os

import click

from ..version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="neurostat")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error instead of one line.")
def main(debug: bool) -> None:
    """Find, edit and prune the property neurons of speech encoders: HuBERT, wav2vec 2.0, WavLM, data2vec,
    UniSpeech, the Conformers (Wav2Vec2-Conformer, w2v-BERT 2.0, Parakeet) and Whisper's encoder.

    Typical flow: `synth` or a labelled corpus (LibriSpeech + MFA alignments, TIMIT, Lhotse manifests, a
    CSV) → `prepare` → `collect` → `select` → `ablate` / `prune`, with `report`, `browse`, `diff` and `probe`
    to look at the results.
    `neurostat collect` with no arguments runs the whole embedded demo offline.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # quiet third-party bars; neurostat's own stay
    if not debug:  # the hub's retry lines: a failed load ends in one error of ours, which says what to do
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # read when huggingface_hub sets its logger up
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # in case it already has


def demo_model_name(ctx, param, value):
    """Click callback: ``--model demo`` names the shipped demo model, resolved here already so that
    messages and folder checks see its folder (the library resolves ``demo`` too)."""
    if not value:  # no model given: nothing to resolve (and no torch to import for it)
        return value
    from ..model.checkpoints import model_source

    return tuple(model_source(v) for v in value) if isinstance(value, tuple) else model_source(value)


def user_errors(command):
    """Reports the library's user errors as one line: options that do not go together as a usage error
    (exit 2), any other ``ValueError`` or ``UserError`` as an error (exit 1), and so the file system's
    refusals (a read-only or full disk, a file where a folder should be), naming the path.  A progress
    bar still on the screen is ended first, so the message starts a line of its own."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        from ..errors import OptionError, UserError

        if click.get_current_context().find_root().params.get("debug"):
            return command(*args, **kwargs)
        try:
            return command(*args, **kwargs)
        except OptionError as e:
            _end_progress_bars()
            raise click.UsageError(str(e)) from None
        except (UserError, ValueError) as e:
            _end_progress_bars()
            raise click.ClickException(str(e)) from None
        except OSError as e:
            _end_progress_bars()
            raise click.ClickException(os_error_message(e)) from None

    return run


def os_error_message(e: OSError) -> str:
    """One line for a file-system error: the path(s), the system's reason, and what to do about the usual ones."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    reason = e.strerror or str(e) or type(e).__name__
    advice = {
        errno.EACCES: "check the folder's permissions or choose another place",
        errno.EPERM: "check the folder's permissions or choose another place",
        errno.EROFS: "choose another place",
        errno.ENOSPC: "free some space or choose another disk",
        errno.EDQUOT: "free some space or choose another disk",
    }.get(e.errno)
    return f"{where + ': ' if where else ''}{reason}{'; ' + advice if advice else ''} (--debug shows the traceback)"


def _end_progress_bars() -> None:
    """Closes the tqdm bars still open (an error interrupted them), so that what follows starts a new line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


allow_other_model = click.option(
    "--allow-other-model",
    is_flag=True,
    help="Accept neuron files whose settings (.settings.json) record another model than this one: their "
    "indices name other neurons unless the models line up (e.g. the same model fine-tuned).",
)


def with_preset(options: dict) -> dict:
    """The command's options with ``--preset``'s values filled in where the user gave none."""
    from ..presets import apply_preset

    ctx = click.get_current_context()
    given = {name for name in options if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    return apply_preset(options.pop("preset", None), options, given)


def preset_option(f):
    from ..presets import PRESETS

    return click.option(
        "--preset",
        type=click.Choice(sorted(PRESETS)),
        default=None,
        help="Fill the options not given with a preset's values: paper = Lin et al.'s labelling and tokens "
        "(overlap frame labels, YAAPT F0 at 20 ms, 33rd/66th percentile edges, the paper's pitch classes, "
        "phone-mid tokens without the final run, λ = 0.01).",
    )(f)
