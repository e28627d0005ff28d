"""Steering: generate with one latent's decoder direction added to the hooked activation.

    saepipe steer CONFIG --layer 3 --latent 17 --strength 4 --strength 2x --prompt "The cat"

For each strength S, the activation x at (layer, hook) of every position the SAE
was trained on becomes x + S * W_dec[latent] while the model generates greedily,
so the continuation shows what the latent pushes the model towards. The saved SAE
takes raw activations (any scalar input scale is folded into its weights at save
time), so a decoder row is already in the model's activation space; an SAE
trained on per-token layer-normed inputs reconstructs x as
x_hat * (std(x) + eps) + mean(x), so its row is scaled by each token's
std(x) + eps the same way (the SAE's input_scale, the one owner of that rule; a
transcoder's row is added at the hook it predicts, output_scale).

The prompt is tokenised as the store's windows were (pipeline.data: no special
tokens from the tokenizer, then BOS first when the store prepended it; the SAE's
cfg.json records prepend_bos, and data.special_ids picks the BOS id). An SAE
folder that records no prepend_bos (not made by `saepipe train`) gets the
tokenizer's own encoding. Position 0 is left alone when the SAE never saw it
(its exclude_bos with a BOS there: eval's rule, pipeline.eval.passes_bos):
the model's attention sink, where a large push turns the text to garbage.
"Position 0" is the sequence's first position: greedy feeds the prompt once,
then one new token per forward (KV cache), so only the first forward holds it.

A strength is raw (a multiple of the decoder row: `8`) or relative (`2x`: twice
the latent's max activation in its collated records, pipeline.viewer.read_feature's
max_act; the raw value each gives is printed). Relative strengths need records
of the SAE at hand (`saepipe collate`); missing or stale ones are one line.

With train.sweep, `member` picks the sweep member whose SAE steers (its folder
`<hook>@<member>`); none picks the plain one, the `{}` entry.

Limits. A prompt that fills the model's positions (pipeline.model.max_positions:
learned tables index past their end, rotary models run outside what they were
trained on) is refused. When the prompt and --max-new-tokens together pass them,
each continuation stops at the last position, and a line says how many tokens
that leaves: the prompt's length in tokens is not something a user knows before
the run, so a refusal would only make them guess again. Strengths must be
finite; a strength given twice (4 and 4.0, or 2x and 2.0x) gets one row, and a
line says so.

    plan   check everything cheap first (prompt, strengths, SAE folder, latent
           index, records for relative strengths), then load the causal LM and
           the hook point
    run    the unsteered continuation, then one per strength; a table of them
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.paths import leaf, records_dir, sae_dir
from pipeline.saes import load_sae, saved_marker, trained


@dataclass
class Plan:
    model: nn.Module
    tokenizer: object
    layer: int
    hook: str
    latent: int
    direction: torch.Tensor  # [d] W_dec[latent], on the model's device and dtype
    input_scale: Callable  # the SAE's output_scale: x [.., d] -> how much larger x is than what it decodes
    strengths: dict[str, float]  # row name (strength_key; `2x` for a relative one) -> multiple of the row
    prompt_ids: torch.Tensor  # [1, T], BOS first when the store's windows opened with it
    max_new_tokens: int  # what fits in the model's positions after the prompt
    pass_bos: bool = False  # position 0 (BOS, which the SAE never saw) is left alone
    notes: list[str] = field(default_factory=list)  # lines run() prints above the table
    labels: dict[str, str] = field(default_factory=dict)  # row name -> its label in the table, when other


@dataclass(frozen=True)
class Strength:
    """One --strength: `value` times the decoder row (raw), or, relative, `value` times the
    latent's max activation in its collated records."""
    value: float
    relative: bool = False

    @property
    def key(self) -> str:
        return strength_key(self.value) + ("x" if self.relative else "")


def parse_strength(s: float | str) -> Strength:
    """A number (raw) or a number followed by x (relative); anything else, or a non-finite
    number, is a UserError."""
    if isinstance(s, (int, float)):
        text, number, relative = str(s), float(s), False
    else:
        text = str(s).strip()
        relative = text[-1:] in ("x", "X")
        try:
            number = float(text[:-1] if relative else text)
        except ValueError:
            raise UserError(f"--strength {s!r} is not a strength; give a number (a multiple of the decoder row, "
                            "e.g. --strength 8) or a number followed by x (times the latent's max activation "
                            "in its collated records, e.g. --strength 2x)") from None
    if not math.isfinite(number):
        raise UserError(f"--strength {text} is not a finite number; give finite multiples of the decoder row, "
                        "e.g. --strength 4 --strength -8, or of the latent's max activation, e.g. --strength 2x")
    return Strength(number, relative)


def _hook(cfg: Config, layer: int, hook: str | None) -> str:
    """--hook, else the one hook the config trains."""
    if hook is not None:
        return hook
    hooks = list(dict.fromkeys(h for _, h in cfg.targets("train", [layer])))
    if len(hooks) > 1:
        raise UserError(f"the config trains several hooks ({', '.join(hooks)}); pick one with --hook")
    return hooks[0]


def _member(cfg: Config, member: str | None) -> str | None:
    """--member, checked against the config's train.sweep (or a member's KL fine-tune, pipeline.finetune:
    `kl`, `<member>-kl`); None (the plain SAE) only when it trains one."""
    from pipeline.paths import finetuned

    names = [name for name, _ in cfg.train.members()]
    if member in names or member in [finetuned(n) for n in names]:
        return member
    listed = ", ".join("{} (no --member)" if n is None else n for n in names)
    if member is None:
        raise UserError(f"the config's train.sweep has no plain entry ({{}}); pick a member with --member: {listed}")
    raise UserError(f"--member {member!r} is not a member of the config's train.sweep; choose one of: {listed}")


def plan(cfg: Config, layer: int, latent: int, strengths: list[float | str], prompt: str, hook: str | None = None,
         max_new_tokens: int = 32, member: str | None = None) -> Plan:
    from pipeline.eval import passes_bos
    from pipeline.model import load_causal_lm, resolve_hook_points

    if not prompt.strip():
        raise UserError("--prompt is empty; give the text the model should continue")
    if not strengths:
        raise UserError("no --strength given; pass one or more, e.g. --strength 4 --strength 8 (or --strength 2x)")
    wanted, notes = _distinct([parse_strength(s) for s in strengths])
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens = {max_new_tokens} must be at least 1")
    hook, member = _hook(cfg, layer, hook), _member(cfg, member)
    folder = sae_dir(cfg.run_path, layer, hook, member)
    trained(folder, layer, leaf(hook, member))
    sae = load_sae(folder)
    if not 0 <= latent < sae.n_latents:
        raise UserError(f"--latent {latent} is out of range: the SAE of layer {layer} hook {leaf(hook, member)} has "
                        f"latents 0..{sae.n_latents - 1}")
    raw, labels = {}, {}
    relative = [s for s in wanted if s.relative]
    if relative:  # the records are of the SAE's own hook (a transcoder's input hook)
        top = max_activation(cfg.run_path, layer, hook, member, latent, folder, relative[0].key)
    for s in wanted:
        raw[s.key] = s.value * top if s.relative else s.value
        if s.relative:
            labels[s.key] = f"{s.key}={raw[s.key]:.4g}"
            notes.append(f"steer: --strength {s.key} is {strength_key(s.value)} x latent {latent}'s max activation "
                         f"{top:.6g} (its collated records): {raw[s.key]:.6g} x the decoder row")

    if sae.transcoder:  # its decoder writes to the hook it predicts: the direction is added there
        notes.append(f"layer {layer} {leaf(hook, member)} is a transcoder to {sae.cfg['target_hook']}: its decoder "
                     f"row is added at {sae.cfg['target_hook']}")
        hook = sae.cfg["target_hook"]
    model, tokenizer = load_causal_lm(cfg.model.name, cfg.model.revision, cfg.model.dtype, cfg.model.device)
    resolve_hook_points(model, [(layer, hook)])  # a layer past the model's last is refused in one line
    param = next(model.parameters())
    ids, bos = prompt_ids(tokenizer, prompt, sae.cfg.get("prepend_bos"))
    if len(ids) - bos == 0:  # BOS alone is no prompt
        raise UserError("--prompt encodes to no tokens; give the text the model should continue")
    max_new_tokens, note = _fit_positions(model, len(ids), max_new_tokens, bos)
    direction = sae.W_dec[latent].detach().to(param.device, param.dtype)
    return Plan(model, tokenizer, layer, hook, latent, direction, sae.output_scale, raw,
                torch.tensor([ids], device=param.device), max_new_tokens, bos and passes_bos(sae.cfg),
                notes + ([note] if note else []), labels)


def prompt_ids(tokenizer, prompt: str, prepend_bos: bool | None) -> tuple[list[int], bool]:
    """(the prompt's token ids, whether BOS opens them), cut as the store's windows were: the text
    without the tokenizer's special tokens, after BOS when the store prepended it (the BOS id:
    pipeline.data.special_ids, the one rule). prepend_bos None (nothing records how the store
    was cut): the tokenizer's own encoding."""
    from pipeline.data import special_ids

    if prepend_bos is None:
        return list(tokenizer(prompt).input_ids), False
    prepend_bos, bos, _ = special_ids(tokenizer, bool(prepend_bos))
    text = list(tokenizer(prompt, add_special_tokens=False).input_ids)
    return ([bos] + text, True) if prepend_bos else (text, False)


def max_activation(run_dir, layer: int, hook: str, member: str | None, latent: int, sae_folder,
                   asked: str = "2x") -> float:
    """Latent `latent`'s max activation in the collated records of the SAE in `sae_folder`
    (pipeline.viewer.read_feature's max_act); records missing, made from other weights,
    unreadable, or where the latent never fired are a UserError saying what to run."""
    from pipeline import viewer
    from pipeline.collate import records

    out = records_dir(run_dir, layer, hook, member)
    name = f"layer {layer} hook {leaf(hook, member)}"
    rerun = f"run `saepipe collate CONFIG --layers {layer}`, or give a raw strength (e.g. --strength 8)"
    changes = records.changed_settings(out, {"sae.sha256": (saved_marker(sae_folder) or {}).get("sha256")})
    if changes is None:
        raise UserError(f"--strength {asked} is relative to latent {latent}'s max activation, but {name} has no "
                        f"collated records (looked in {out}); {rerun}")
    if changes:
        raise UserError(f"--strength {asked} is relative to latent {latent}'s max activation, but the records in "
                        f"{out} are of other weights ({changes[0]}); {rerun}")
    try:
        top = viewer.read_feature(out, latent).get("max_act")
    except (OSError, ValueError, IndexError) as e:
        raise UserError(f"cannot read latent {latent}'s record in {out} ({e}); run `saepipe collate CONFIG "
                        f"--layers {layer} --force`, or give a raw strength (e.g. --strength 8)") from None
    if not isinstance(top, (int, float)) or isinstance(top, bool) or not math.isfinite(top):
        raise UserError(f"latent {latent}'s record in {out} holds no max activation (max_act {top!r}); run "
                        f"`saepipe collate CONFIG --layers {layer} --force`, or give a raw strength "
                        "(e.g. --strength 8)")
    if top <= 0:
        raise UserError(f"latent {latent} of {name} never fired in its collated records (max activation {top:g}), "
                        f"so --strength {asked} would add nothing; give a raw strength (e.g. --strength 8)")
    return float(top)


def strength_key(s: float) -> str:
    """A strength's row name: short (4, not 4.0), but never the same for two different values."""
    short = f"{s:g}"
    return short if float(short) == s else repr(s)


def _distinct(strengths: list[Strength]) -> tuple[list[Strength], list[str]]:
    """The strengths without repeats (4 and 4.0 are one, 2x and 2.0x too), and a note for each repeated one."""
    counts: dict[Strength, int] = {}
    for s in strengths:
        counts[s] = counts.get(s, 0) + 1
    notes = [f"steer: --strength {s.key} is given {n} times; one row for it (greedy is deterministic)"
             for s, n in counts.items() if n > 1]
    return list(counts), notes


def _fit_positions(model: nn.Module, n_prompt: int, max_new_tokens: int, bos: bool = False) -> tuple[int, str | None]:
    """How many tokens fit after the prompt (n_prompt ids, BOS among them when `bos`) in the
    model's positions, and the note when fewer than asked; a prompt that leaves no room is refused."""
    from pipeline.model import max_positions

    limit = max_positions(model)
    if limit is None or n_prompt + max_new_tokens <= limit[0]:
        return max_new_tokens, None
    n, source = limit
    name = type(model).__name__
    after = " after the BOS the store's windows open with" if bos else ""
    if n_prompt >= n:
        raise UserError(f"--prompt is {n_prompt - bos} tokens{after}, and {name} has {n} positions ({source}): no "
                        f"room to generate; shorten the prompt to at most {n - 1 - bos} tokens")
    return n - n_prompt, (f"steer: the prompt's {n_prompt - bos} tokens{after} and --max-new-tokens {max_new_tokens} "
                          f"pass {name}'s {n} positions ({source}); each continuation stops there, after "
                          f"{n - n_prompt} new tokens")


@torch.inference_mode()
def greedy(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, eos: int | None) -> list[int]:
    """The argmax continuation of ids [1, T] (KV cache; stops after EOS): the first forward
    holds the whole prompt, each later one only the token before."""
    # transformers 5 renamed past_key_values to cache; take whichever this version has
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out, past, x = [], None, ids
    for _ in range(max_new_tokens):
        o = model(input_ids=x, use_cache=True, **{key: past})
        past = o[key]
        nxt = o.logits[:, -1].argmax(-1)
        out.append(int(nxt))
        if eos is not None and out[-1] == eos:
            break
        x = nxt[:, None]
    return out


def steered(p: Plan, strength: float) -> list[int]:
    """The greedy continuation with strength * W_dec[latent] added at every position the SAE
    was trained on (all but the sequence's first when p.pass_bos)."""
    from pipeline.model import splice

    d = p.direction.shape[0]
    seen = 0  # positions through the hook so far: greedy's forwards hold positions seen..seen + T - 1

    def add(x: torch.Tensor) -> torch.Tensor:
        nonlocal seen
        if x.shape[-1] != d:
            raise UserError(f"layer {p.layer} hook {p.hook} outputs width {x.shape[-1]}, but its SAE "
                            f"takes d_in = {d}; retrain it: saepipe train CONFIG --layers {p.layer} --force")
        first, seen = seen, seen + x.shape[1]
        scale = p.input_scale(x.float())
        new = x + strength * p.direction * (scale.to(x.dtype) if torch.is_tensor(scale) else scale)
        if p.pass_bos and first == 0:  # this forward holds position 0: BOS passes unchanged
            new = torch.cat([x[:, :1], new[:, 1:]], dim=1)
        return new

    with splice(p.model, p.layer, p.hook, add):
        return greedy(p.model, p.prompt_ids, p.max_new_tokens, p.tokenizer.eos_token_id)


def run(cfg: Config, layer: int, latent: int, strengths: list[float | str], prompt: str, hook: str | None = None,
        max_new_tokens: int = 32, echo=print, member: str | None = None) -> dict[str, list[int]]:
    """Print the clean and the steered continuations, one row each; return their token ids
    ("clean" and one key per distinct strength: strength_key, with an x after a relative one)."""
    p = plan(cfg, layer, latent, strengths, prompt, hook, max_new_tokens, member)
    eos = p.tokenizer.eos_token_id
    rows = {"clean": greedy(p.model, p.prompt_ids, p.max_new_tokens, eos)}
    for key, s in p.strengths.items():
        rows[key] = steered(p, s)

    def text(ids):  # json quotes keep newlines and edge spaces visible on one line
        return json.dumps(p.tokenizer.decode(ids, skip_special_tokens=False), ensure_ascii=False)

    for note in p.notes:
        echo(note)
    kept = ", position 0 (BOS) left alone" if p.pass_bos else ""
    echo(f"steer layer {p.layer} hook {leaf(p.hook, member)} latent {p.latent}, greedy, {p.max_new_tokens} new "
         f"tokens{kept}")
    echo(f"prompt: {json.dumps(prompt, ensure_ascii=False)}")
    labels = {key: p.labels.get(key, key) for key in rows}
    width = max(len("strength"), *(len(v) for v in labels.values()))
    echo(f"{'strength':>{width}}  continuation")
    for key, ids in rows.items():
        echo(f"{labels[key]:>{width}}  {text(ids)}")
    return rows
