"""`saepipe`: one command group over the stages.

Every stage validates the whole config first, and turns any UserError into one
line on stderr and exit code 2 (no traceback); bugs keep their traceback.
"""

from __future__ import annotations

import functools
import sys

import click

from pipeline.errors import UserError

_CONFIG = click.argument("config", type=click.Path(dir_okay=False))
_LAYERS = click.option(
    "--layers", default=None, metavar="'3,4'",
    help="Layers to act on (comma or space separated); default: the config's.",
)
_SET = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a config key, e.g. --set harvest.n_tokens=200000 (value parsed as YAML). Repeatable.",
)
_FORCE = click.option("--force", is_flag=True, help="Redo layers that are already finished.")


def _member(does: str):
    """--member of a command run with one SAE per hook: which train.sweep member's SAE `does`."""
    return click.option("--member", default=None, metavar="NAME",
                        help=f"The train.sweep member (or the KL fine-tuned copy: kl) whose SAE {does}; default: "
                             "the plain one (the sweep's {} entry).")


def _fail(message: str, code: int = 2):
    click.echo(f"saepipe: error: {message}", err=True)
    sys.exit(code)


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.fsio import disk_error_message

        _LOADED.clear()
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _fail(_with_path_notes(str(e)), e.exit_code)
        except OSError as e:  # disk full, read-only run_dir, ...: the user's to fix, not a bug
            message = disk_error_message(e)
            if message is None:
                raise
            _fail(message)
        except KeyboardInterrupt:
            click.echo("saepipe: interrupted; rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper


class _Group(click.Group):
    """click's own usage errors (a folder as CONFIG, an unknown option) as our one line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.UsageError as e:
            cmd = " ".join(["saepipe", *e.ctx.command_path.split()[1:]]) if e.ctx else "saepipe"
            _fail(f"{e.format_message()} (see `{cmd} --help`)")
        except click.exceptions.ClickException as e:
            _fail(e.format_message())
        except click.exceptions.Abort:
            click.echo("saepipe: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


# The config this command loaded, so that an error naming one of its paths says where that path was read from.
_LOADED: list = []


def _load(config, overrides):
    from pipeline.config import load_config

    cfg = load_config(config, overrides)
    _LOADED[:] = [cfg]
    return cfg


def _with_path_notes(message: str) -> str:
    """`message`, and for each relative path of the loaded config that it names (a store not found,
    a data file missing, ...), the folder that path was read from and why (pipeline.paths)."""
    notes = [n.why for cfg in _LOADED for n in cfg.path_notes() if n.path in message]
    return message if not notes else f"{message} ({'; '.join(notes)})"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="saepipe")
def main():
    """saepipe: harvest activations, train SAEs (TopK, BatchTopK, JumpReLU, ...), collate latent records.

    Each stage reads the same YAML config and caches its results under the
    config's run_dir, so any stage can be rerun alone (e.g. on a new layer).
    """


@main.command()
@_CONFIG
@_LAYERS
@_SET
@click.option("--repair", is_flag=True,
              help="Find the missing or corrupt chunks of the config's arrays and of the tokens, "
                   "and rewrite exactly those.")
@click.option("--force", is_flag=True,
              help="Start the config's arrays over with the current settings (e.g. a new storage_dtype).")
@_user_errors
def harvest(config, layers, overrides, repair, force):
    """Run the model over the dataset and store the chosen layers' activations.

    Writes <run_dir>/activations.zarr. Rerunning resumes an interrupted harvest,
    adds new layers aligned with the stored tokens, and skips finished layers;
    a config whose settings differ from the store's is refused.
    """
    from pipeline.config import parse_layers
    from stages import harvest as stage

    stage.run(_load(config, overrides), layers=parse_layers(layers), repair=repair, force=force)


@main.command()
@click.argument("run", metavar="RUN_DIR|CONFIG", type=click.Path())
@_SET
@click.option("--threads", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Chunk files read at once.")
@_user_errors
def verify(run, overrides, threads):
    """Check every chunk of a run's store: present, checksum intact, logged as written.

    RUN_DIR checks <run_dir>/activations.zarr; a CONFIG (a .yaml file) checks the
    store it names, wherever it lives (`store: s3://...`). Exit 0 when the store
    is sound; 2 with one line naming the bad arrays and chunks, which `saepipe
    harvest CONFIG --repair` rewrites.
    """
    from pathlib import Path

    from stages import verify as stage

    if Path(run).is_file():
        from pipeline.store import Location

        run = Location.of(_load(run, overrides))
    elif overrides:
        raise click.UsageError("--set needs a CONFIG, not a RUN_DIR")
    stage.run(run, threads)


@main.command()
@_CONFIG
@_LAYERS
@_SET
@_FORCE
@_user_errors
def train(config, layers, overrides, force):
    """Train one SAE (train.sae: its architecture) per harvested (layer, hook) into <run_dir>/saes/<L>/<hook>/.

    With train.sweep, one SAE per member from one pass over the batches, a named
    member's in <hook>@<name>/. An interrupted run resumes from its last
    checkpoint; finished SAEs are skipped unless --force.
    """
    from pipeline.config import parse_layers
    from stages import train as stage

    stage.run(_load(config, overrides), layers=parse_layers(layers), force=force)


@main.command()
@_CONFIG
@_LAYERS
@_SET
@_FORCE
@_user_errors
def finetune(config, layers, overrides, force):
    """Fine-tune each trained SAE on KL(clean || spliced) through the frozen model.

    On windows of the store's own tokens (its training chunks; eval's windows stay
    held out), finetune.n_tokens of them; the copy goes beside its base, into
    <run_dir>/saes/<L>/<hook>@kl/ (a train.sweep member's: <hook>@<name>-kl/), and
    eval and collate take it with the others. Resumes from its last checkpoint;
    finished fine-tunes of the same base weights are skipped unless --force.
    """
    from pipeline.config import parse_layers
    from stages import finetune as stage

    stage.run(_load(config, overrides), layers=parse_layers(layers), force=force)


@main.command()
@_CONFIG
@_LAYERS
@_SET
@_FORCE
@_user_errors
def collate(config, layers, overrides, force):
    """Write per-latent top/random activation records and a static viewer.

    Output: <run_dir>/records/<L>/<hook>/ (viewer_data/ holding the records,
    index.json, summary.json, viewer.html) and <run_dir>/records/index.html
    linking every layer's viewer; with train.sweep, each member's records in
    <hook>@<name>/. Finished layers are skipped unless --force;
    records made with other settings or another SAE are redone.
    """
    from pipeline.config import parse_layers
    from stages import collate as stage

    stage.run(_load(config, overrides), layers=parse_layers(layers), force=force)


@main.command()
@_CONFIG
@_LAYERS
@_SET
@_FORCE
@_user_errors
def explain(config, layers, overrides, force):
    """N2G explanations of every live latent from its collated records, scored on held-out windows.

    Each latent's top and random records become token patterns (the shortest suffix that keeps
    half the activation, unimportant tokens as wildcards, ^ when it must open the text), scored
    by precision, recall, F1 and correlation on the store's last explain.n_score_windows windows
    beside a single-token baseline. Writes explanations.json and explain_summary.json into
    <run_dir>/records/<L>/<hook>/ (run collate first); an interrupted run resumes; finished
    explanations of the same records and settings are skipped unless --force.
    """
    from pipeline.config import parse_layers
    from stages import explain as stage

    stage.run(_load(config, overrides), layers=parse_layers(layers), force=force)


@main.command()
@_CONFIG
@click.option("--layer", required=True, type=int, help="The SAE's layer.")
@click.option("--hook", default=None, help="The SAE's hook; default: the config's one hook.")
@click.option("--latent", required=True, type=int, help="The latent whose decoder direction is added.")
@click.option("--strength", "strengths", required=True, multiple=True, metavar="S|Fx",
              help="Multiple of W_dec[latent] added at every position the SAE was trained on (finite): S raw, or "
                   "Fx for F times the latent's max activation in its collated records (e.g. 2x; needs "
                   "`saepipe collate`). Repeatable, raw and relative mixed: one continuation each (a repeated "
                   "value, one).")
@click.option("--prompt", required=True, help="The text to continue.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="Tokens generated per continuation (greedy); fewer, with a line saying so, where the prompt "
                   "and these would pass the model's positions.")
@_member("steers")
@_SET
@_user_errors
def steer(config, layer, hook, latent, strengths, prompt, max_new_tokens, member, overrides):
    """Generate with a latent's decoder direction added to the hooked activation.

    Prints the unsteered greedy continuation and one steered continuation per
    --strength, one row each (deterministic), and the raw value of each relative
    one (2x). The prompt is tokenised as the store's windows were (BOS first when
    they opened with it), and position 0 is left alone when the SAE never saw it
    (exclude_bos). A prompt that fills the model's positions is refused; past
    them, each continuation stops at the last one.
    """
    from stages import steer as stage

    stage.run(_load(config, overrides), layer, latent, list(strengths), prompt, hook, max_new_tokens, member)


@main.command()
@_CONFIG
@click.option("--prompt", required=True, help="The text whose latents to show.")
@_LAYERS
@click.option("--hook", default=None, help="The SAEs' hook; default: every hook of the chosen layers.")
@click.option("--top", default=5, show_default=True, type=click.IntRange(1, 1000),
              help="Latents shown per token, the strongest first.")
@click.option("--latent", default=None, type=int,
              help="Follow this one latent over the prompt instead: its activation at every token, with a bar.")
@click.option("--html", "html_out", default=None, type=click.Path(), metavar="OUT",
              help="Also write a self-contained page: per latent shown, a heatmap over the prompt, its explanation "
                   "and scores, and a link to its page in the records' viewer.")
@_member("reads")
@_SET
@_user_errors
def inspect(config, prompt, layers, hook, top, latent, html_out, member, overrides):
    """Show, token by token, which latents of the trained SAEs fire on a prompt.

    Runs the model once over the prompt (stopped after the deepest chosen layer) and prints,
    per SAE, one row per token: its top --top latents as latent:activation, then each one's
    N2G F1 and explanation when `saepipe explain` has run on those weights. The prompt is cut
    as the store's windows were (BOS first when they opened with it); the position collate
    leaves out (that BOS, with collate.exclude_bos) is shown, marked *. A prompt longer than
    the model's positions is refused.
    """
    from pipeline.config import parse_layers
    from stages import inspect as stage

    stage.run(_load(config, overrides), prompt, parse_layers(layers), hook, member, top, latent, html_out)


@main.command(name="eval")
@_CONFIG
@_LAYERS
@_SET
@_FORCE
@_user_errors
def eval_(config, layers, overrides, force):
    """Splice each trained SAE into the causal LM and measure the loss it costs.

    On held-out windows (the harvest's corpus past the harvested windows): CE
    clean, spliced and zero-ablated, delta_ce, ce_recovered, KL(clean||spliced),
    fvu, l0, dead_frac. Writes <run_dir>/saes/<L>/<hook>/eval.json (and each
    train.sweep member's, in <hook>@<name>/) and prints a table; finished evals
    of the same SAE weights are skipped unless --force.
    """
    from pipeline.config import parse_layers
    from stages import eval as stage

    stage.run(_load(config, overrides), layers=parse_layers(layers), force=force)


@main.command()
@click.argument("sae_dir", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["saelens", "sparsify", "neuronpedia"]), required=True,
              help="Folder layout to write.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to create.")
@click.option("--member", default=None, metavar="NAME",
              help="Export the train.sweep member NAME of SAE_DIR's hook (the folder SAE_DIR@NAME beside it).")
@click.option("--np-model-id", default=None, metavar="ID",
              help="neuronpedia: the model's id on Neuronpedia (default: from the model's name).")
@click.option("--np-set-name", default=None, metavar="NAME",
              help="neuronpedia: the source set's name; the source is <layer>-NAME (default: saepipe-<hook>).")
@_user_errors
def export(sae_dir, fmt, out, member, np_model_id, np_set_name):
    """Export a trained SAE folder for SAELens (SAE.load_from_disk) or sparsify, or its
    collated records and N2G explanations as Neuronpedia's feature upload batches."""
    from stages import export as stage

    stage.run(sae_dir, fmt, out, member, np_model_id, np_set_name)


if __name__ == "__main__":
    main()
