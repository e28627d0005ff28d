"""Fine-tune: trained SAEs trained a little more on what the language model feels.

    saepipe finetune CONFIG [--layers 15] [--force]

Reconstruction training (pipeline.train) never sees the model: an SAE that misses a direction
the next layers lean on costs far more loss than one that misses a loud, unused one. This
stage takes each trained SAE (every (layer, hook) of train, every train.sweep member) and
trains a copy of it through the frozen causal LM (Braun et al., 2024; a short KL fine-tune
after cached training, Karvonen, 2025):

    loss = KL(clean || spliced) + recon_coefficient * FVU

    KL   mean over the spliced positions of sum_v p_clean(v) (log p_clean(v) - log p_spliced(v)),
         the next-token distributions of the model as it is and with the SAE's reconstruction in
         place of its hook's activation (a transcoder's prediction in place of its target's)
    FVU  the SAE's own reconstruction error at those positions, in its training space (what
         pipeline.train minimises), to keep the reconstruction near the activations

on windows of the store's own `tokens` (no new harvest): only the store's training chunks,
never the ones train held out, and never eval's windows (those come after the store). The
positions the SAE never trained on (BOS, eval.passes_bos) pass through unchanged, as in eval.

Cost: one no-grad forward per batch gives the clean log-probabilities and the output of the
block below the splice; every SAE of the batch then runs only the blocks from its hook up,
forward and backward (pipeline.model.resume_after_block), the model's weights frozen. With a
sweep the clean forward is shared by every member.

Output: the fine-tuned SAE beside its base, a normal SAE folder <hook>@kl (a sweep member's
<hook>@<member>-kl; pipeline.paths.finetuned) that eval, collate, steer and export take like any
other; its cfg.json is the base's plus `finetune` (tokens, steps, loss, lr, recon_coefficient,
the base's sha256) and `eval` redone on the held-out rows. A finished fine-tune is skipped
while its fingerprint (base weights, settings, model, store) holds; one killed resumes from
its last checkpoint (<folder>.partial/checkpoint.pt) to identical weights: the batches are a
function of the seed and the step.

Only an architecture whose sparsity holds without its training penalty is fine-tuned
(Dictionary.finetunes: a fixed k, or a fixed threshold); the forward is the inference one
(train_forward of an evaluation view), the one eval splices.

A threshold SAE (Dictionary.calibrate: BatchTopK's one theta) would keep its theta through the
steps while the KL pushes its encoder's pre-activations up: on SmolLM2 block 15 a fixed theta
let L0 climb ~13% over 120 steps. With finetune.calibrate (default) each batch first re-fits
theta to its own spliced positions so that they keep k latents a token on average (the batch
rule BatchTopK trains with), and at the end theta is re-fit to the rows train held out;
cfg.json's `finetune.threshold` gives the last batch's and the held-out one. Those rows' L0 in `eval` is then k by
construction; `saepipe eval`'s, on windows past the store, is the check. (KL on block 15, seed
0, 61k tokens: 0.2467 this way, 0.2505 with theta fixed and re-fit only at the end.)
"""

from __future__ import annotations

import io
import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import optim
from pipeline.config import Config, FinetuneConfig
from pipeline.errors import UserError
from pipeline.eval import passes_bos, splice_point
from pipeline.fsio import target_locks, write_atomic
from pipeline.harvest import diffs
from pipeline.metrics import describe, fvu_space
from pipeline.model import load_causal_lm, record_block_outputs, resume_after_block, splice
from pipeline.paths import finetuned, leaf, model_key, sae_dir
from pipeline.saes import ARCHITECTURES, Dictionary, TrainView, load_sae, saved_cfg, trained
from pipeline.store import ActivationStore, Location

FORMAT = 1
CHECKPOINT = "checkpoint.pt"


# --------------------------------------------------------------------------- the loss
def reconstruct(sae: Dictionary, x: torch.Tensor, src: torch.Tensor | None = None, calibrate: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(what replaces x [N, d] in the model, with a graph; the reconstruction FVU in the SAE's
    training space). x is the hook's raw activation; a transcoder reads src (its input hook's).
    `calibrate`: a threshold SAE first re-fits its threshold to these rows (the batch rule)."""
    from pipeline.train import reconstruction_loss

    xf = x.float()
    read = xf if src is None else src.float()
    xp = sae.preprocess(read)
    if calibrate:
        sae.calibrate(xp.detach())
    o = sae.train_forward(xp, TrainView())
    if sae.transcoder:
        y = o.x_hat + sae.skip(xp)
        return y, reconstruction_loss(xf, y)[0]
    return sae.postprocess(o.x_hat, xf), reconstruction_loss(xp, o.x_hat)[0]


def kl_clean_spliced(logp_clean: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(clean || spliced): logp_clean, logits [B, T, V] (no shift: every
    position's next-token distribution, the last one's included)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return (logp_clean.exp() * (logp_clean - logp)).sum(-1).mean()


def learning_rate(fc: FinetuneConfig, step: int, n_steps: int, lr: float) -> float:
    """Linear warm-up over fc.warmup of the steps, then lr to the end (constant) or cosine decay to 0."""
    warm = max(1, round(fc.warmup * n_steps))
    if step < warm:
        return lr * (step + 1) / warm
    if fc.lr_schedule == "constant":
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, n_steps - warm)))


# --------------------------------------------------------------------------- plan
@dataclass
class Target:
    layer: int
    hook: str
    member: str | None  # the base's train.sweep member (None: the plain SAE)
    base: Path  # the trained SAE's folder
    out: Path  # the fine-tuned one's
    fingerprint: dict
    sae: Dictionary | None = None
    opt: torch.optim.Optimizer | None = None
    step: int = 0  # steps done (from the checkpoint)
    pass_bos: bool = False
    log: list | None = None

    @property
    def name(self) -> str:
        return f"layer {self.layer} {leaf(self.hook, self.member)}"

    @property
    def work(self) -> Path:
        return self.out.with_name(self.out.name + ".partial")


@dataclass
class Plan:
    cfg: Config
    fc: FinetuneConfig
    targets: list[Target]
    todo: list[Target]
    windows: np.ndarray | None  # int64 [n_windows, T]: every window the run forwards, in order
    model: object | None
    n_steps: int


def fingerprint(cfg: Config, fc: FinetuneConfig, base_sha: str, store: ActivationStore) -> dict:
    """What a fine-tuned SAE depends on: the base's weights, the settings, the model, the store."""
    keep = ("n_tokens", "batch_size", "lr", "warmup", "lr_schedule", "recon_coefficient", "calibrate", "seed")
    return {"format": FORMAT, "base_sha256": base_sha, "model.name": model_key(cfg.model.name),
            "model.revision": cfg.model.revision, "model.dtype": cfg.model.dtype,
            "store": store.attrs.get("fingerprint"), **{f"finetune.{k}": getattr(fc, k) for k in keep}}


def training_windows(store: ActivationStore, layer: int, hook: str, held_out: list[int]) -> np.ndarray:
    """The ids [n] of the store's windows whose every row lies in a training chunk of (layer, hook)."""
    T, rows = store.context_size, store.chunk_rows(layer, hook)
    n = store.tokens_shape[0]
    first, last = np.arange(n) * T // rows, (np.arange(n) * T + T - 1) // rows
    bad = np.zeros(max(1, store.n_chunks(layer, hook)) + 1, dtype=bool)
    bad[[c for c in held_out if c < len(bad)]] = True
    ok = np.ones(n, dtype=bool)
    for c in np.flatnonzero(bad):
        ok &= ~((first <= c) & (last >= c))
    return np.flatnonzero(ok)


def order(ids: np.ndarray, n_windows: int, seed: int) -> np.ndarray:
    """n_windows of ids, a new seeded permutation each pass over them."""
    g = torch.Generator().manual_seed(seed)
    passes = [ids[torch.randperm(len(ids), generator=g).numpy()] for _ in range(-(-n_windows // len(ids)))]
    return np.concatenate(passes)[:n_windows]


@contextmanager
def plan(cfg: Config, layers: list[int] | None = None, force: bool = False):
    """The Plan, valid while the `with` holds every target's finetune lock."""
    fc, run_dir = cfg.finetune, cfg.run_path
    loc = Location.of(cfg)
    if not loc.exists():
        raise UserError(f"no activation store at {loc.path}; finetune reads its token windows: harvest first "
                        "(saepipe harvest CONFIG)")
    store = ActivationStore(loc)
    if not store.has_tokens():
        raise UserError(f"the store at {loc.path} holds no token ids (harvested by an older saepipe); finetune "
                        "needs them: harvest again in a new run_dir")
    T = store.context_size
    n_windows = fc.n_tokens // T
    if n_windows == 0:
        raise UserError(f"finetune.n_tokens = {fc.n_tokens} is below one window of {T} tokens; raise it")
    sae_targets = cfg.sae_targets("finetune", layers)
    with target_locks(run_dir, "finetune", sae_targets):
        targets, ids = [], None
        for layer, hook, member in sae_targets:
            base = sae_dir(run_dir, layer, hook, member)
            marker, sae_cfg = trained(base, layer, leaf(hook, member))
            _check_base(base, sae_cfg, cfg, store)
            mine = training_windows(store, layer, hook, sae_cfg.get("eval_chunks") or [])
            ids = mine if ids is None else np.intersect1d(ids, mine)
            out = sae_dir(run_dir, layer, hook, finetuned(member))
            t = Target(layer, hook, member, base, out, fingerprint(cfg, fc, marker["sha256"], store))
            targets.append(t)
        todo = [t for t in targets if force or not _done(t)]
        if not todo:
            yield Plan(cfg, fc, targets, [], None, None, 0)
            return
        if ids is None or len(ids) == 0:
            raise UserError("every window of the store touches a chunk train held out; nothing is left to "
                            "fine-tune on: harvest more tokens")
        windows = store.read_tokens(0, store.tokens_shape[0])[order(ids, n_windows, fc.seed)].astype(np.int64)
        model, _ = load_causal_lm(cfg.model.name, cfg.model.revision, cfg.model.dtype, fc.device)
        model.requires_grad_(False)
        device = next(model.parameters()).device
        for t in todo:
            t.sae = load_sae(t.base, device=device)
            if not t.sae.finetunes:
                able = ", ".join(name for name, cls in ARCHITECTURES.items() if cls.finetunes)
                raise UserError(f"{t.base} holds a {t.sae.architecture} SAE, whose sparsity comes from its "
                                "training penalty, which a KL fine-tune does not carry (its L0 would drift); "
                                f"fine-tune an SAE of fixed k or thresholds: {able}")
            t.pass_bos = passes_bos(t.sae.cfg)
        _check_splice(model, todo, T)
        yield Plan(cfg, fc, targets, todo, windows, model, -(-n_windows // fc.batch_size))


def _check_base(base: Path, sae_cfg: dict, cfg: Config, store: ActivationStore):
    trained_on = sae_cfg.get("model")
    if trained_on is not None and model_key(trained_on) != model_key(cfg.model.name):
        raise UserError(f"the SAE in {base} was trained on model {trained_on!r}, but model.name is "
                        f"{cfg.model.name!r}; fine-tune it with the config it was trained with")
    there, now = sae_cfg.get("store_fingerprint"), store.attrs.get("fingerprint")
    changed = diffs(there, now) if isinstance(there, dict) and isinstance(now, dict) else []
    if changed:
        raise UserError(f"the store was harvested again since the SAE in {base} was trained ({'; '.join(changed)}), "
                        "so its token windows may be the SAE's held-out ones; retrain it: saepipe train CONFIG "
                        "--force")


def _check_splice(model, todo: list[Target], T: int):
    """Every target's splice point outputs the residual shape (a hidden MLP layer cannot be spliced)."""
    from pipeline.eval import Target as EvalTarget, _splicable

    targets = [EvalTarget(t.layer, t.hook, t.base, {}, None, [], t.member) for t in todo]
    saes = {e.key: t.sae for e, t in zip(targets, todo)}
    kept = _splicable(model, targets, saes, T)
    if len(kept) != len(targets):
        left = [t for t in targets if t not in kept]
        raise UserError(f"layer {left[0].layer} hook {leaf(left[0].hook, left[0].member)} cannot be spliced into "
                        "the model (see the line above); fine-tune SAEs of resid_post, attn_out, mlp_out or mlp_in")


def _done(t: Target) -> bool:
    cfg = saved_cfg(t.out)
    return cfg is not None and not diffs((cfg.get("finetune") or {}).get("fingerprint"), t.fingerprint)


# --------------------------------------------------------------------------- run
def run(cfg: Config, layers: list[int] | None = None, force: bool = False, progress: bool = True) -> list[dict]:
    """Fine-tune what is not done; one summary row per target (done now or before)."""
    with plan(cfg, layers, force) as p:
        for t in p.targets:
            if t not in p.todo:
                print(f"finetune: {t.name}: done with these settings and base weights; skipping (--force to redo)")
        if p.todo:
            finetune(p, force, progress)
        return [{"layer": t.layer, "hook": leaf(t.hook, finetuned(t.member)), **(saved_cfg(t.out) or {}).get(
            "finetune", {})} for t in p.targets]


def finetune(p: Plan, force: bool = False, progress: bool = True):
    fc, model, windows = p.fc, p.model, p.windows
    device = next(model.parameters()).device
    lr = fc.lr
    for t in p.todo:
        t.opt = optim.make("adam", t.sae.parameters(), lr)
        t.log = []
        _resume(t, force)
    B, T = fc.batch_size, windows.shape[1]
    start = min(t.step for t in p.todo)
    print(f"finetune: {len(p.todo)} SAE(s), {p.n_steps} steps of {B} windows x {T} tokens ({len(windows) * T} "
          f"tokens), lr {lr:.3g}, recon_coefficient {fc.recon_coefficient}, {device.type}"
          + (f"; resuming at step {start}" if start else ""))
    bar = tqdm(total=len(windows) * T, initial=min(start * B, len(windows)) * T, desc="finetune", unit="tok",
               unit_scale=True, disable=not progress)
    began = time.perf_counter()
    try:
        for step in range(start, p.n_steps):
            ids = torch.from_numpy(windows[step * B:(step + 1) * B]).to(device)
            due = [t for t in p.todo if t.step == step]
            starts = sorted({below(t) for t in due if below(t) >= 0})
            before = {}
            with torch.no_grad(), record_block_outputs(model, starts, before):
                logp_clean = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
            for t in due:
                row = train_step(model, t, ids, logp_clean, before, learning_rate(fc, step, p.n_steps, lr), fc)
                t.step = step + 1
                t.log.append({"step": t.step, "tokens": t.step * B * T, **row})
                if t.step % fc.checkpoint_every == 0 and t.step < p.n_steps:
                    _checkpoint(t)
            del logp_clean, before
            bar.update(ids.numel())
            bar.set_postfix(kl=f"{p.todo[0].log[-1]['kl']:.4f}")
    finally:
        bar.close()
    seconds = time.perf_counter() - began
    for t in p.todo:
        _finish(p, t, seconds)


def below(t: Target) -> int:
    """The block whose (clean) output the spliced forward starts from: the hook's own block for
    resid_post (the splice replaces that output), the one below for a hook inside the block."""
    where, source = splice_point(t.hook, t.sae)
    return t.layer if (where, source) == ("resid_post", None) else t.layer - 1


def spliced_loss(model, t: Target, ids: torch.Tensor, logp_clean: torch.Tensor, before: dict,
                 recon_coefficient: float, calibrate: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KL, FVU) of t's SAE spliced into the model on windows ids [B, T], with a graph to the
    SAE's parameters. logp_clean [B, T, V]: the clean run's log-probabilities; before: the clean
    run's block outputs (record_block_outputs), where the forward starts (below(t)). `calibrate`:
    reconstruct's, on the spliced positions of the batch."""
    first = 1 if t.pass_bos else 0
    recon = []

    def replace(x, src=None):
        body = x[:, first:]
        y, fvu = reconstruct(t.sae, body.reshape(-1, body.shape[-1]),
                             None if src is None else src[:, first:].reshape(-1, src.shape[-1]), calibrate)
        recon.append(fvu)
        new = y.to(x.dtype).reshape(body.shape)
        return torch.cat([x[:, :first], new], dim=1) if first else new

    where, source = splice_point(t.hook, t.sae)
    start = below(t)
    with splice(model, t.layer, where, replace, source), \
            (resume_after_block(model, start, before[start]) if start >= 0 else nullcontext()):
        logits = model(input_ids=ids).logits
    # Position 0 is not spliced when BOS passes: its distribution is the clean one, and not averaged in.
    kl = kl_clean_spliced(logp_clean[:, first:], logits[:, first:])
    return (kl + recon_coefficient * recon[0] if recon_coefficient else kl), kl, recon[0]


def train_step(model, t: Target, ids: torch.Tensor, logp_clean: torch.Tensor, before: dict, lr: float,
               fc: FinetuneConfig) -> dict:
    """One Adam step of t's SAE on this batch; the loss terms for the log."""
    loss, kl, fvu = spliced_loss(model, t, ids, logp_clean, before, fc.recon_coefficient, fc.calibrate)
    for group in t.opt.param_groups:
        group["lr"] = lr
    t.opt.zero_grad(set_to_none=True)
    loss.backward()
    t.opt.step()
    return {"loss": loss.item(), "kl": kl.item(), "fvu": fvu.item(), "lr": lr}


# --------------------------------------------------------------------------- files
def _checkpoint(t: Target):
    buf = io.BytesIO()
    torch.save({"fingerprint": t.fingerprint, "step": t.step, "sae": t.sae.state_dict(),
                "opt": t.opt.state_dict(), "log": t.log}, buf)
    t.work.mkdir(parents=True, exist_ok=True)
    write_atomic(t.work / CHECKPOINT, buf.getvalue())


def _resume(t: Target, force: bool):
    """Load t's checkpoint when it was made with t's fingerprint (else start over, saying why)."""
    path = t.work / CHECKPOINT
    if force or not path.exists():
        return
    try:
        state = torch.load(path, map_location=next(t.sae.parameters()).device, weights_only=True)
    except Exception as e:  # a torn file cannot be: write_atomic; anything else is another format
        print(f"finetune: {t.name}: its checkpoint cannot be read ({type(e).__name__}); starting over")
        return
    changed = diffs(state.get("fingerprint"), t.fingerprint)
    if changed:
        print(f"finetune: {t.name}: its checkpoint was made with other settings ({'; '.join(changed)}); "
              "starting over")
        return
    t.sae.load_state_dict(state["sae"])
    t.opt.load_state_dict(state["opt"])
    t.step, t.log = state["step"], state["log"]


def _finish(p: Plan, t: Target, seconds: float):
    """The held-out rows' statistics redone, then the folder saved (marker last) and swapped in."""
    from pipeline import plots
    from pipeline.train import evaluate
    from pipeline.train_state import publish

    base_cfg = dict(t.sae.cfg)
    rows = held_out_rows(p, t, base_cfg)
    threshold = None
    if p.fc.calibrate and rows is not None:
        threshold = t.sae.calibrate(t.sae.preprocess(rows[:, :t.sae.d_in].to(t.sae.W_enc.device)))
    ev = {}
    if rows is not None:
        ev = evaluate(t.sae, rows, 1.0, 4096)
        ev.pop("density")
    tokens = t.step * p.fc.batch_size * p.windows.shape[1]
    info = {
        "eval": ev,
        "finetune": {"loss": "kl", "tokens": min(tokens, p.windows.size), "steps": t.step, "lr": p.fc.lr,
                     "lr_schedule": p.fc.lr_schedule,
                     "recon_coefficient": p.fc.recon_coefficient, "batch_size": p.fc.batch_size,
                     "seed": p.fc.seed, "base": t.base.name, "base_sha256": t.fingerprint["base_sha256"],
                     "kl_first": t.log[0]["kl"], "kl_last": t.log[-1]["kl"], "seconds": seconds,
                     "threshold": threshold,
                     "fingerprint": t.fingerprint},
    }
    t.work.mkdir(parents=True, exist_ok=True)
    with open(t.work / "metrics.jsonl", "w") as f:
        for row in t.log:
            f.write(json.dumps({"split": "finetune", **row}) + "\n")
    space = fvu_space(t.sae)
    plots.loss_figure(t.work, [{"split": "train", **r} for r in t.log], f"{t.name}: KL fine-tune", space)
    t.sae.save(t.work, info)
    (t.work / CHECKPOINT).unlink(missing_ok=True)
    publish(t.work, t.out)
    held_out = f"; {describe(ev, space)}" if ev else ""
    if threshold:
        held_out += (f"; threshold re-fit to the held-out rows: {threshold['after']:.4g} (the last batch's "
                     f"{threshold['before']:.4g})")
    print(f"finetune: {t.name}: done; KL on its batches {t.log[0]['kl']:.4f} -> {t.log[-1]['kl']:.4f}{held_out} "
          f"-> {t.out}")


def held_out_rows(p: Plan, t: Target, base_cfg: dict) -> torch.Tensor | None:
    """The rows train held out ([N, d], a transcoder's [N, 2d]: input and target side by side),
    or None when it held none out: what cfg.json's `eval` is redone on, and the threshold re-fit to."""
    from pipeline.loader import RowFilter

    chunks = base_cfg.get("eval_chunks") or []
    if not chunks:
        return None
    store = ActivationStore(Location.of(p.cfg))
    rf = RowFilter(store, t.layer, t.hook, bool(base_cfg.get("exclude_bos")), True)
    target = base_cfg.get("target_hook") if t.sae.transcoder else None
    parts = []
    for c in chunks:
        x = rf(c, store.read_chunk(t.layer, t.hook, c)).float()
        if target:
            y = rf(c, store.read_chunk(t.layer, target, c)).float()
            x = torch.cat([x, y], dim=1)
        parts.append(x)
    return torch.cat(parts)

