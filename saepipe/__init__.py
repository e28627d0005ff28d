"""saepipe from Python: open a run, read its store, load its SAEs, splice them into the model.

    import saepipe

    run = saepipe.open_run("configs/smollm2.yaml")        # or a run folder (no model then)
    sae = run.sae(3)                                        # any architecture, raw space in and out
    x = run.store.read_rows(3, "resid_post", 0, 1024)       # [1024, d_model] harvested activations
    code = sae.encode(x)                                    # Code: idx, vals [1024, k]
    x_hat = sae.decode(code)                                # back where x lives (== sae.reconstruct(x))
    model, tokenizer = run.model()
    ids = run.tokenize("def read(path):")                  # cut as the store was (BOS when it had one)
    with saepipe.spliced(model, sae):                       # the model with the SAE in place of its hook
        logits = model(input_ids=ids).logits
    run.feature(3, latent=7)                                # collate's record of latent 7

Public: this module (`open_run`, `load_sae`, `Run`, `SAE`, `Code`, `spliced`, `capture`) and the
objects it returns (`pipeline.store.ActivationStore`, `pipeline.config.Config`). Everything else
under `pipeline/` is internal and may change.

One space: `SAE.encode` takes raw activations, as the model and the store hold them, and
`SAE.decode` / `SAE.reconstruct` give raw activations back, whatever the SAE normalised inside
(`normalize: layer_norm` divides each row by its spread; the code remembers it). This is what
`saepipe eval` splices. The normalised space, where the decoder's rows live, is there only when
asked for: `SAE.dictionary`, the trained `pipeline.saes.Dictionary`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from pipeline.config import Config, load_config
from pipeline.errors import UserError
from pipeline.paths import leaf, records_dir, sae_dir
from pipeline.saes import Dictionary, trained
from pipeline.saes import load_sae as _load_dictionary
from pipeline.store import ActivationStore, Location

__all__ = ["open_run", "load_sae", "Run", "SAE", "Code", "spliced", "capture"]


@dataclass
class Code:
    """The sparse code of raw activations [N, d] (leading dims flattened to N)."""
    idx: torch.Tensor  #: [N, w] int64: the latents each row kept
    vals: torch.Tensor  #: [N, w]: their activations (0 = off)
    scale: torch.Tensor | float  #: [N, 1] or 1.0: what decode multiplies the dictionary's output by
    shift: torch.Tensor | float  #: [N, 1], [N, d] or 0.0: what it adds (row mean; a transcoder's skip term)
    shape: torch.Size  #: the leading dims of the rows encoded
    n_latents: int

    def dense(self) -> torch.Tensor:
        """[*shape, n_latents]: every latent's activation, zero where off."""
        out = torch.zeros(self.idx.shape[0], self.n_latents, dtype=self.vals.dtype, device=self.vals.device)
        return out.scatter_(1, self.idx, self.vals).reshape(*self.shape, self.n_latents)

    def l0(self) -> torch.Tensor:
        """[*shape]: how many latents fire on each row."""
        return (self.vals > 0).sum(-1).reshape(self.shape)


class SAE:
    """A trained dictionary of any architecture, in the space of the activations it was trained on.

    `encode(x)` -> Code and `decode(code)` -> x_hat take and give raw activations [..., d];
    `reconstruct(x)` is both (what `saepipe eval` splices in). A transcoder encodes its input
    hook's activations and decodes to its prediction of the output hook's."""

    def __init__(self, dictionary: Dictionary, folder: Path | None = None):
        self.dictionary = dictionary  #: the trained module, in its normalised space
        self.folder = folder  #: where it was loaded from
        self.cfg: dict = dict(getattr(dictionary, "cfg", None) or {})  #: its cfg.json (layer, hook, model, ...)

    @property
    def architecture(self) -> str:
        return self.dictionary.architecture

    @property
    def layer(self) -> int:
        return int(self.cfg["layer"])

    @property
    def hook(self) -> str:
        """The hook it reads (a transcoder's input hook; its output goes to `target_hook`)."""
        return self.cfg["hook"]

    @property
    def target_hook(self) -> str:
        """The hook its output replaces: its own hook, or a transcoder's output hook."""
        return self.cfg.get("target_hook") or self.hook if self.dictionary.transcoder else self.hook

    @property
    def d_model(self) -> int:
        return self.dictionary.d_in

    @property
    def n_latents(self) -> int:
        return self.dictionary.n_latents

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Code:
        """x [..., d] raw activations -> their Code."""
        d = self.dictionary
        lead, xf = x.shape[:-1], x.reshape(-1, x.shape[-1]).float()
        idx, vals = d.encode(xf)
        if d.transcoder:
            scale, shift = 1.0, d.skip(d.preprocess(xf))
        elif d.normalize == "layer_norm":  # postprocess's inverse of preprocess, kept per row
            scale, shift = d.input_scale(xf), xf.mean(-1, keepdim=True)
        else:
            scale, shift = 1.0, 0.0
        return Code(idx, vals, scale, shift, lead, d.n_latents)

    @torch.no_grad()
    def decode(self, code: Code) -> torch.Tensor:
        """A Code -> x_hat [..., d] in the raw space its rows came from."""
        x_hat = self.dictionary.decode(code.idx, code.vals) * code.scale + code.shift
        return x_hat.reshape(*code.shape, x_hat.shape[-1])

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] raw -> x_hat [..., d] raw: decode(encode(x))."""
        return self.decode(self.encode(x))

    def direction(self, latent: int) -> torch.Tensor:
        """[d] latent's decoder row (unit norm, in the normalised space when the SAE normalises:
        times a row's spread it is in raw units; `saepipe steer` does this per position)."""
        return self.dictionary.W_dec[latent].detach()

    def to(self, device) -> "SAE":
        self.dictionary.to(device)
        return self

    def __repr__(self) -> str:
        return (f"SAE({self.architecture}, layer {self.cfg.get('layer')} {self.cfg.get('hook')}, "
                f"d_model {self.d_model}, n_latents {self.n_latents})")


def load_sae(folder, device: str = "cpu") -> SAE:
    """The SAE saved in `folder` (a `saes/<layer>/<hook>` folder of a run, or an exported copy in
    saepipe's format), checked against its recorded sha256."""
    return SAE(_load_dictionary(Path(folder), device=device), Path(folder))


class Run:
    """A run: its config (None when opened from a folder), store, SAEs, records and model."""

    def __init__(self, run_dir: Path, config: Config | None = None):
        self.run_dir = Path(run_dir)  #: where SAEs, records and progress live
        self.config = config  #: the Config it was opened with, or None
        self._model = None

    @property
    def store(self) -> ActivationStore:
        """The activation store (read_rows(layer, hook, start, stop), read_tokens(first, last), attrs)."""
        loc = Location.of(self.config) if self.config is not None else Location(self.run_dir)
        if not loc.exists():
            raise UserError(f"no activation store at {loc.path}; run saepipe harvest first")
        return ActivationStore(loc)

    def _hook(self, hook: str | None) -> str:
        if hook is not None:
            return hook
        hooks = self.config.harvest.hooks if self.config is not None else ["resid_post"]
        return hooks[0]

    def sae(self, layer: int, hook: str | None = None, member: str | None = None, device: str = "cpu") -> SAE:
        """The trained SAE of (layer, hook) (default: the first harvested hook), or a sweep
        member's (`member="k64"`; the KL fine-tuned copy is member "kl")."""
        hook = self._hook(hook)
        folder = sae_dir(self.run_dir, layer, hook, member)
        trained(folder, layer, leaf(hook, member))
        return load_sae(folder, device)

    def saes(self) -> list[Path]:
        """Every finished SAE folder of the run."""
        return sorted(p.parent for p in (self.run_dir / "saes").glob("*/*/done"))

    def features(self, layer: int, hook: str | None = None, member: str | None = None) -> Iterator[dict]:
        """Every latent's record from `saepipe collate` (top and random activations, density, the logit
        lens), in latent order."""
        from pipeline.viewer import read_features

        return read_features(self._records(layer, hook, member))

    def feature(self, layer: int, latent: int, hook: str | None = None, member: str | None = None) -> dict:
        """One latent's record from `saepipe collate`."""
        from pipeline.viewer import read_feature

        return read_feature(self._records(layer, hook, member), latent)

    def _records(self, layer, hook, member) -> Path:
        folder = records_dir(self.run_dir, layer, self._hook(hook), member)
        if not folder.is_dir():
            raise UserError(f"no records in {folder}; run saepipe collate CONFIG --layers {layer} first")
        return folder

    def _need_config(self, what: str) -> Config:
        if self.config is None:
            raise UserError(f"{what} needs the run's config: open it with saepipe.open_run('its.yaml')")
        return self.config

    def model(self):
        """(model, tokenizer) of the config, loaded once (eval mode, model.device, model.dtype)."""
        if self._model is None:
            from pipeline.model import load_causal_lm

            m = self._need_config("the model").model
            self._model = load_causal_lm(m.name, m.revision, m.dtype, m.device)
        return self._model

    def tokenize(self, text: str) -> torch.Tensor:
        """[1, T] token ids of text, cut as the store's windows were (BOS first when it prepended one)."""
        from pipeline.steer import prompt_ids

        _, tokenizer = self.model()
        prepend = self.store.attrs.get("prepend_bos") if self._has_store() else self.config.harvest.prepend_bos
        ids, _ = prompt_ids(tokenizer, text, prepend)
        return torch.tensor([ids], device=next(self.model()[0].parameters()).device)

    def _has_store(self) -> bool:
        try:
            self.store
        except UserError:
            return False
        return True

    def evaluate(self, layers: list[int] | None = None, force: bool = False) -> list[dict]:
        """`saepipe eval`: each SAE spliced into the model over held-out windows; one row per SAE
        (layer, hook, ce_clean, ce_spliced, delta_ce, kl, fvu, l0, ...), cached in its eval.json."""
        from pipeline import eval as lm_eval

        rows = lm_eval.run(self._need_config("evaluate"), layers, force, progress=False)
        return [{"layer": layer, "hook": hook, **row} for layer, hook, row in rows]

    def steer(self, layer: int, latent: int, prompt: str, strengths=(4.0,), hook: str | None = None,
              max_new_tokens: int = 32, member: str | None = None) -> dict[str, str]:
        """`saepipe steer`: greedy continuations of prompt, clean and with latent's direction added
        at each strength (a float, raw units; or "2x", times the latent's max activation)."""
        from pipeline import steer

        cfg = self._need_config("steer")
        rows = steer.run(cfg, layer, latent, list(strengths), prompt, hook, max_new_tokens, echo=lambda *_: None,
                         member=member)
        _, tokenizer = self.model()
        return {key: tokenizer.decode(ids, skip_special_tokens=False) for key, ids in rows.items()}


def open_run(where, overrides: list[str] | tuple[str, ...] = ()) -> Run:
    """A run from its config file (YAML; `overrides` as --set gives them: "train.k=64") or from its
    run folder (store, SAEs and records only: the model needs the config)."""
    where = Path(where)
    if where.is_dir():
        if overrides:
            raise UserError("overrides need a config file, not a run folder")
        return Run(where)
    if not where.is_file():
        raise UserError(f"no config file or run folder at {where}")
    cfg = load_config(where, list(overrides))
    return Run(cfg.run_path, cfg)


@contextmanager
def spliced(model, *saes: SAE, pass_bos: bool | None = None):
    """While inside, each SAE's reconstruction replaces its hook's activation in model's forward
    (a transcoder's prediction replaces its output hook's, read from its input hook), as in
    `saepipe eval`: position 0 passes unchanged when the SAE never trained on BOS (pass_bos None:
    as its cfg.json says)."""
    from contextlib import ExitStack

    from pipeline.eval import passes_bos, splice_point
    from pipeline.model import splice

    with ExitStack() as stack:
        for sae in saes:
            keep_bos = passes_bos(sae.cfg) if pass_bos is None else pass_bos
            where, source = splice_point(sae.hook, sae.dictionary)
            stack.enter_context(splice(model, sae.layer, where, _replacer(sae, keep_bos), source))
        yield model


def _replacer(sae: SAE, keep_bos: bool):
    def fn(x: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        first = 1 if keep_bos else 0
        read = (x if src is None else src)[:, first:]
        new = sae.reconstruct(read).to(x.dtype)
        return torch.cat([x[:, :first], new], dim=1) if first else new

    return fn


def capture(model, input_ids: torch.Tensor, points: list[tuple[int, str]]) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, hook): [B, T, d]} activations of model on input_ids [B, T], as harvest stores them
    (hooks: resid_post, mlp_in, mlp_out, ...); the forward stops after the deepest block asked for."""
    from pipeline.model import ActivationCapture

    return ActivationCapture(model, list(points)).run(input_ids)
