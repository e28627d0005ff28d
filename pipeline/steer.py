"""Steering: generate with one latent's decoder direction added to the hooked activation.

    saepipe steer CONFIG --layer 3 --latent 17 --strength 4 --strength 8 --prompt "The cat"

For each strength S, every position's activation x at (layer, hook) becomes
x + S * W_dec[latent] while the model generates greedily, so the continuation
shows what the latent pushes the model towards. The saved SAE takes raw
activations (any scalar input scale is folded into its weights at save time),
so a decoder row is already in the model's activation space; an SAE trained on
per-token layer-normed inputs reconstructs x as x_hat * (std(x) + eps) + mean(x),
so its row is scaled by each token's std(x) + eps the same way (the SAE's
input_scale, the one owner of that rule; a transcoder's row is added at the hook it predicts,
output_scale).

With train.sweep, `member` picks the sweep member whose SAE steers (its folder
`<hook>@<member>`); none picks the plain one, the `{}` entry.

Limits. A prompt that fills the model's positions (pipeline.model.max_positions:
learned tables index past their end, rotary models run outside what they were
trained on) is refused. When the prompt and --max-new-tokens together pass them,
each continuation stops at the last position, and a line says how many tokens
that leaves: the prompt's length in tokens is not something a user knows before
the run, so a refusal would only make them guess again. Strengths must be
finite; a strength given twice (4 and 4.0) gets one row, and a line says so.

    plan   check everything cheap first (prompt, SAE folder, latent index), then
           load the causal LM and the hook point
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
from pipeline.paths import DONE, leaf, sae_dir
from pipeline.saes import load_sae


@dataclass
class Plan:
    model: nn.Module
    tokenizer: object
    layer: int
    hook: str
    latent: int
    direction: torch.Tensor  # [d] W_dec[latent], on the model's device and dtype
    input_scale: Callable  # the SAE's output_scale: x [.., d] -> how much larger x is than what it decodes
    strengths: list[float]
    prompt_ids: torch.Tensor  # [1, T]
    max_new_tokens: int  # what fits in the model's positions after the prompt
    notes: list[str] = field(default_factory=list)  # lines run() prints above the table


def _hook(cfg: Config, layer: int, hook: str | None) -> str:
    """--hook, else the one hook the config trains."""
    if hook is not None:
        return hook
    hooks = list(dict.fromkeys(h for _, h in cfg.targets("train", [layer])))
    if len(hooks) > 1:
        raise UserError(f"the config trains several hooks ({', '.join(hooks)}); pick one with --hook")
    return hooks[0]


def _member(cfg: Config, member: str | None) -> str | None:
    """--member, checked against the config's train.sweep; None (the plain SAE) only when it trains one."""
    names = [name for name, _ in cfg.train.members()]
    if member in names:
        return member
    listed = ", ".join("{} (no --member)" if n is None else n for n in names)
    if member is None:
        raise UserError(f"the config's train.sweep has no plain entry ({{}}); pick a member with --member: {listed}")
    raise UserError(f"--member {member!r} is not a member of the config's train.sweep; choose one of: {listed}")


def plan(cfg: Config, layer: int, latent: int, strengths: list[float], prompt: str, hook: str | None = None,
         max_new_tokens: int = 32, member: str | None = None) -> Plan:
    from pipeline.model import load_causal_lm, resolve_hook_points

    if not prompt.strip():
        raise UserError("--prompt is empty; give the text the model should continue")
    if not strengths:
        raise UserError("no --strength given; pass one or more, e.g. --strength 4 --strength 8")
    bad = [s for s in strengths if not math.isfinite(s)]
    if bad:
        raise UserError(f"--strength {bad[0]} is not a finite number; give finite multiples of the decoder row, "
                        "e.g. --strength 4 --strength -8")
    strengths, notes = _distinct(strengths)
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens = {max_new_tokens} must be at least 1")
    hook, member = _hook(cfg, layer, hook), _member(cfg, member)
    folder = sae_dir(cfg.run_path, layer, hook, member)
    if not (folder / DONE).exists():
        raise UserError(f"no trained SAE for layer {layer} hook {leaf(hook, member)} (looked in {folder}); "
                        f"run `saepipe train CONFIG --layers {layer}` first")
    sae = load_sae(folder)
    if not 0 <= latent < sae.n_latents:
        raise UserError(f"--latent {latent} is out of range: the SAE of layer {layer} hook {leaf(hook, member)} has "
                        f"latents 0..{sae.n_latents - 1}")

    if sae.transcoder:  # its decoder writes to the hook it predicts: the direction is added there
        notes.append(f"layer {layer} {leaf(hook, member)} is a transcoder to {sae.cfg['target_hook']}: its decoder "
                     f"row is added at {sae.cfg['target_hook']}")
        hook = sae.cfg["target_hook"]
    model, tokenizer = load_causal_lm(cfg.model.name, cfg.model.revision, cfg.model.dtype, cfg.model.device)
    resolve_hook_points(model, [(layer, hook)])  # a layer past the model's last is refused in one line
    param = next(model.parameters())
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(param.device)
    if ids.shape[1] == 0:
        raise UserError("--prompt encodes to no tokens; give the text the model should continue")
    max_new_tokens, note = _fit_positions(model, ids.shape[1], max_new_tokens)
    direction = sae.W_dec[latent].detach().to(param.device, param.dtype)
    return Plan(model, tokenizer, layer, hook, latent, direction, sae.output_scale,
                strengths, ids, max_new_tokens, notes + ([note] if note else []))


def strength_key(s: float) -> str:
    """A strength's row name: short (4, not 4.0), but never the same for two different values."""
    short = f"{s:g}"
    return short if float(short) == s else repr(s)


def _distinct(strengths: list[float]) -> tuple[list[float], list[str]]:
    """The strengths without repeats (4 and 4.0 are one), and a note for each repeated one."""
    counts: dict[float, int] = {}
    for s in strengths:
        counts[float(s)] = counts.get(float(s), 0) + 1
    notes = [f"steer: --strength {strength_key(s)} is given {n} times; one row for it (greedy is deterministic)"
             for s, n in counts.items() if n > 1]
    return list(counts), notes


def _fit_positions(model: nn.Module, n_prompt: int, max_new_tokens: int) -> tuple[int, str | None]:
    """How many tokens fit after the prompt in the model's positions, and the note when fewer
    than asked; a prompt that leaves no room is refused."""
    from pipeline.model import max_positions

    limit = max_positions(model)
    if limit is None or n_prompt + max_new_tokens <= limit[0]:
        return max_new_tokens, None
    n, source = limit
    name = type(model).__name__
    if n_prompt >= n:
        raise UserError(f"--prompt is {n_prompt} tokens, and {name} has {n} positions ({source}): no room to "
                        f"generate; shorten the prompt to at most {n - 1} tokens")
    return n - n_prompt, (f"steer: the prompt's {n_prompt} tokens and --max-new-tokens {max_new_tokens} pass {name}'s "
                          f"{n} positions ({source}); each continuation stops there, after {n - n_prompt} new tokens")


@torch.inference_mode()
def greedy(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, eos: int | None) -> list[int]:
    """The argmax continuation of ids [1, T] (KV cache; stops after EOS)."""
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
    """The greedy continuation with strength * W_dec[latent] added at every position."""
    from pipeline.model import splice

    d = p.direction.shape[0]

    def add(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != d:
            raise UserError(f"layer {p.layer} hook {p.hook} outputs width {x.shape[-1]}, but its SAE "
                            f"takes d_in = {d}; retrain it: saepipe train CONFIG --layers {p.layer} --force")
        scale = p.input_scale(x.float())
        return x + strength * p.direction * (scale.to(x.dtype) if torch.is_tensor(scale) else scale)

    with splice(p.model, p.layer, p.hook, add):
        return greedy(p.model, p.prompt_ids, p.max_new_tokens, p.tokenizer.eos_token_id)


def run(cfg: Config, layer: int, latent: int, strengths: list[float], prompt: str, hook: str | None = None,
        max_new_tokens: int = 32, echo=print, member: str | None = None) -> dict[str, list[int]]:
    """Print the clean and the steered continuations, one row each; return their token ids
    ("clean" and one key per distinct strength, named by strength_key)."""
    p = plan(cfg, layer, latent, strengths, prompt, hook, max_new_tokens, member)
    eos = p.tokenizer.eos_token_id
    rows = {"clean": greedy(p.model, p.prompt_ids, p.max_new_tokens, eos)}
    for s in p.strengths:
        rows[strength_key(s)] = steered(p, s)

    def text(ids):  # json quotes keep newlines and edge spaces visible on one line
        return json.dumps(p.tokenizer.decode(ids, skip_special_tokens=False), ensure_ascii=False)

    for note in p.notes:
        echo(note)
    echo(f"steer layer {p.layer} hook {leaf(p.hook, member)} latent {p.latent}, greedy, {p.max_new_tokens} new tokens")
    echo(f"prompt: {json.dumps(prompt, ensure_ascii=False)}")
    width = max(len("strength"), *(len(k) for k in rows))
    echo(f"{'strength':>{width}}  continuation")
    for key, ids in rows.items():
        echo(f"{key:>{width}}  {text(ids)}")
    return rows
