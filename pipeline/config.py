"""The run config: one YAML file, loaded into typed dataclasses and checked
before any work starts.

Every stage reads the same file and acts on its own section. Type checking is
generic (walks the dataclass fields), so adding a key is adding a field; each
field carries its documentation (`setting(default, doc)`), from which docs/config.md's
config reference is generated:

    python -m pipeline.config --markdown
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from pipeline import dtypes
from pipeline.optim import OPTIMIZERS
from pipeline.errors import UserError
from pipeline.kernels import BACKENDS
from pipeline.paths import is_url, resolve_config_paths

NAMED_HOOKS = ("resid_post", "attn_out", "mlp_out", "mlp_in")


class ConfigError(UserError):
    pass


def setting(default: Any = dataclasses.MISSING, doc: str = "", logistics: bool = False):
    """A config field and its documentation (docs/config.md's reference is generated from `doc`).

    `logistics` marks a field that changes how a run executes, not what it computes:
    an interrupted run may resume, or finished work stand, with another value of it.
    """
    meta = {"doc": doc, "logistics": logistics}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def logistics(section) -> tuple[str, ...]:
    """The fields of a config section marked `logistics`."""
    return tuple(f.name for f in dataclasses.fields(section) if f.metadata.get("logistics"))


@dataclass
class ModelConfig:
    name: str = setting(doc="hub id, local folder, `pkg:PACKAGE/sub/dir` (a folder inside an installed "
                              "package), or a `.gguf` file (also `pkg:PACKAGE/file.gguf`), converted once into "
                              "~/.cache/saepipe/gguf")
    revision: str = setting("main", "hub revision")
    dtype: str = setting("float32", "the dtype the model runs in: float32, float16 or bfloat16")
    device: str = setting("auto", "auto (cuda when present, else cpu), cpu, cuda, cuda:1", logistics=True)

    def validate(self, where):
        _choice(where, "model.dtype", self.dtype, dtypes.NAMES)


@dataclass
class DataConfig:
    path: str = setting(doc="hub dataset, a builder (`json`, `parquet`, `text`, `csv`) with `data_files`, "
                            "or a local file or folder")
    name: str | None = setting(None, "dataset config name")
    data_files: Union[str, list[str], None] = setting(None, "file or files for a builder")
    split: str = setting("train", "dataset split")
    text_column: str = setting("text", "the column that holds the text")
    streaming: bool = setting(False, "stream a hub dataset instead of downloading it (the same rows)",
                              logistics=True)


@dataclass
class HarvestConfig:
    layers: list[int] = setting(doc="block indices (0-based)")
    n_tokens: int = setting(doc="token budget (a whole number of windows is kept)")
    hooks: list[str] = setting(["resid_post"], "`resid_post` (block output), `attn_out`, `mlp_out`, "
                                               "or a dotted module path inside the block (e.g. `mlp.act`)")
    context_size: int = setting(128, "tokens per stored sequence")
    batch_size: int = setting(16, "sequences per forward pass", logistics=True)
    storage_dtype: str = setting("bfloat16", "float32, float16 (overflow is detected and stops the run), bfloat16")
    codec: str = setting("zstd", "none, lz4 (blosc, byte shuffle), zstd (level 3; ~21% smaller than lz4 on "
                                 "bf16 at a similar write speed)")
    chunk_rows: int | None = setting(None, "rows per chunk, a multiple of context_size; null = at least 1 MiB")
    prepend_bos: bool | None = setting(None, "BOS (or CLS) first in each window; null = when the tokenizer has one")
    writer_threads: int = setting(2, "background threads that compress and write", logistics=True)
    queue_size: int = setting(4, "chunks in flight between the forward pass and the writers", logistics=True)

    def validate(self, where):
        if not self.layers:
            raise ConfigError(f"{where}: harvest.layers is empty; name at least one layer, e.g. [3]")
        if any(layer < 0 for layer in self.layers):
            raise ConfigError(f"{where}: harvest.layers must be >= 0, got {self.layers}")
        if not self.hooks:
            raise ConfigError(f"{where}: harvest.hooks is empty; use e.g. [resid_post]")
        _positive(where, "harvest.context_size", self.context_size, minimum=2)
        _positive(where, "harvest.batch_size", self.batch_size)
        _positive(where, "harvest.writer_threads", self.writer_threads)
        _positive(where, "harvest.queue_size", self.queue_size)
        if self.n_tokens < self.context_size:
            raise ConfigError(
                f"{where}: harvest.n_tokens = {self.n_tokens} is below one context "
                f"(harvest.context_size = {self.context_size}); raise n_tokens or lower context_size"
            )
        _choice(where, "harvest.storage_dtype", self.storage_dtype, dtypes.NAMES)
        _choice(where, "harvest.codec", self.codec, ("none", "lz4", "zstd"))
        if self.chunk_rows is not None and (self.chunk_rows <= 0 or self.chunk_rows % self.context_size):
            raise ConfigError(
                f"{where}: harvest.chunk_rows = {self.chunk_rows} must be a positive multiple of "
                f"harvest.context_size = {self.context_size}"
            )


@dataclass(frozen=True)
class TrainConfig:
    layers: list[int] | None = setting(None, "null = harvest.layers", logistics=True)
    hooks: list[str] | None = setting(None, "null = harvest.hooks", logistics=True)
    sae: Any = field(default_factory=lambda: sae_section({}, "train.sae.", "<default>"),
                     metadata={"doc": "the dictionary: its `architecture` and that architecture's own settings (one "
                                      "table each, below); older configs' flat `train.k` etc. mean train.sae.k",
                               "section": True, "logistics": False})
    transcode: dict[str, str] | None = setting(None, "hooks trained as transcoders: {input hook: the hook it "
                                                     "predicts}, e.g. {mlp_in: mlp_out} (harvest both); the "
                                                     "other hooks train SAEs. A transcoder's folder is named "
                                                     "after its input hook")
    skip_connection: bool = setting(False, "transcoders: add a dense skip connection W_skip x (d_model x d_model, "
                                           "starting at zero) to the prediction")
    n_latents: int | None = setting(None, "SAE width; null = expansion_factor × d_model")
    expansion_factor: int = setting(8, "n_latents per d_model, when n_latents is null")
    n_tokens: int = setting(10_000_000, "training budget in tokens; more than one epoch of the store is fine")
    batch_size: int = setting(4096, "tokens per step")
    optimizer: str = setting("adam", "adam, or signum_sf (schedule-free sign descent, sparsify's default; saves "
                                     "the averaged weights)")
    lr: float | None = setting(None, "peak learning rate; null = the optimizer's rule: 2.4e-3 / sqrt(d_model / 768) "
                                     "(adam, at most 1e-2) or 2.5e-3 (signum_sf), times 1/sqrt(n_latents / 2**14)")
    lr_schedule: str = setting("cosine", "after the warmup: cosine (down to 0 at the end) or wsd (flat, then "
                                         "linear to 0 from decay_start); signum_sf only warms up")
    warmup_steps: int = setting(100, "linear lr warmup, capped at a tenth of the run")
    decay_start: float = setting(0.8, "wsd: fraction of the steps after which lr decays linearly to 0")
    sf_beta: float = setting(0.95, "signum_sf: where the gradient is taken between the average (1) and the "
                                   "fast iterate (0)")
    adam_betas: list[float] = setting([0.9, 0.999], "Adam's betas")
    adam_eps: float = setting(6.25e-10, "Adam's eps (tiny, as in OpenAI's TopK recipe)")
    b_pre_init: str = setting("geometric_median", "geometric_median, mean or zeros: the decoder bias at the start")
    init_sample: int = setting(16384, "rows used for b_pre and the scalar normalisation")
    normalize: str = setting("layer_norm", "layer_norm (per token, applied by encode), none, or scalar (one "
                                           "factor so the mean row norm is sqrt(d_model); folded into the saved "
                                           "weights; what --format sparsify export needs)")
    ema_decay: float | None = setting(None, "keep and save an EMA of the weights, e.g. 0.999; null = off")
    grad_clip: float | None = setting(None, "max global gradient norm; null = off")
    autocast: str = setting("auto", "dtype of the dense encoder matmul: auto (bf16 on cuda, else fp32), "
                                    "bf16, fp16, fp32, none (the weights' dtype)")
    device: str = setting("auto", "auto (cuda when present, else cpu), cpu, cuda, cuda:1", logistics=True)
    backend: str = setting("auto", "who runs the sparse products: auto (triton on cuda, else torch), triton, "
                                   "torch", logistics=True)
    seed: int = setting(0, "init, batch order and sampling")
    eval_fraction: float = setting(0.05, "fraction of the chunks held out for eval")
    eval_every: int = setting(500, "steps between eval rows in metrics.jsonl", logistics=True)
    eval_tokens: int = setting(65536, "held-out tokens evaluated", logistics=True)
    log_every: int = setting(20, "steps between train rows in metrics.jsonl", logistics=True)
    checkpoint_every: int = setting(200, "steps between checkpoints (an interrupted run resumes from the last)",
                                    logistics=True)
    shuffle_chunks: int | None = setting(None, "chunks mixed at row level; null = enough for 2**17 rows "
                                                "(at most 512 MiB of them); at least enough for 4 batches")
    reader_threads: int = setting(4, "threads reading and decompressing chunks", logistics=True)
    exclude_bos: bool = setting(True, "leave out position 0 when the store prepended BOS (or CLS)")
    skip_nonfinite: bool = setting(False, "drop rows holding NaN/Inf instead of refusing to train")
    check_finite: bool = setting(True, "count NaN/Inf rows in one read pass before training (off: found mid-run)",
                                 logistics=True)
    shard_latents: bool = setting(False, "under torchrun, split the n_latents over the ranks (each holds n_latents / "
                                         "W rows of W_enc, b_lat, W_dec and their Adam state; every rank sees the "
                                         "whole batch) instead of splitting the batch; for SAEs too wide for one "
                                         "device (docs/guides/gpu.md, torchrun); adam only, no ema_decay or grad_clip",
                                  logistics=True)
    sweep: list[dict] | None = setting(None, "several SAEs per (layer, hook) from one pass over the batches: a list "
                                             "of overrides of this section, one per SAE, e.g. `[{}, {k: 64}, "
                                             "{n_latents: 4096, k: 16, name: wide}]` (`{}` = this config, in the "
                                             "plain folder; the others in `<hook>@<name>`, the name derived from "
                                             "the overrides when not given); the batch stream's keys and the "
                                             "logistics stay shared (docs/guides/sweeps.md)")

    @property
    def n_steps(self) -> int:
        return max(1, self.n_tokens // self.batch_size)

    @staticmethod
    def lift(raw: dict, at: str, where: str) -> dict:
        """`raw` (this section, or a sweep entry) with the dictionary's settings written flat beside
        the trainer's (`k: 32`, as configs did before `sae:`) moved into its `sae` mapping."""
        from pipeline.saes import DEFAULT, architecture

        raw = dict(raw)
        sae = raw.get("sae")
        sae = dict(sae) if isinstance(sae, dict) else sae
        name = sae.get("architecture", DEFAULT) if isinstance(sae, dict) else DEFAULT
        cls = architecture(name, f"{where}: {at}sae.architecture =")
        flat = [key for key in raw if key in {f.name for f in dataclasses.fields(cls.Settings)} - {"architecture"}]
        if flat and sae is not None and not isinstance(sae, dict):
            return raw  # _build refuses the non-mapping sae
        for key in flat:
            if key in (sae or {}):
                raise ConfigError(f"{where}: {at}{key} and {at}sae.{key} are both given; keep {at}sae.{key}")
            sae = {**(sae or {}), key: raw.pop(key)}
        if sae is not None:
            raw["sae"] = sae
        return raw

    def flat(self) -> dict:
        """This section on one level: the sae settings beside the trainer's, `architecture` only when it is
        not the default, so a TopK SAE's fingerprint (pipeline.train) has the keys it always had."""
        from pipeline.saes import DEFAULT

        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "sae"}
        sae = dataclasses.asdict(self.sae)
        if sae.get("architecture") == DEFAULT:
            del sae["architecture"]
        return {**out, **sae}

    def members(self, where: str = "train.sweep") -> list[tuple[str | None, TrainConfig]]:
        """(name, config) of every SAE this section trains per (layer, hook): without a sweep,
        [(None, self)]; with one, each entry's overrides applied to this section (name None for
        the plain config, which keeps the plain folder). Refuses what one shared stream of batches
        cannot give (SWEEP_SHARED, the logistics), unknown keys and repeated names."""
        if self.sweep is None:
            return [(None, self)]
        if not self.sweep:
            raise ConfigError(f"{where}: train.sweep is empty; list at least one SAE's overrides, e.g. [{{}}, {{k: 64}}]"
                              " (or leave it out)")
        hints = typing.get_type_hints(TrainConfig)
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        shared = set(SWEEP_SHARED) | set(logistics(TrainConfig))
        out, seen = [], {}
        for i, entry in enumerate(self.sweep):
            at = f"train.sweep[{i}]"
            written, entry = entry, TrainConfig.lift(entry, f"{at}.", where)
            overrides = {}
            for key, value in entry.items():
                if key == "name":
                    continue
                if key == "sae":
                    overrides[key] = self._member_sae(value, f"{at}.sae.", where)
                    continue
                if key not in fields:
                    raise ConfigError(f"{where}: unknown key {key!r} in {at}; use keys of the train section "
                                      f"(e.g. n_latents, k, lr, aux_alpha) or name")
                if key == "sweep":
                    raise ConfigError(f"{where}: {at} holds a sweep of its own; sweeps do not nest: list every "
                                      "SAE as one entry of train.sweep")
                if key in shared:
                    raise ConfigError(
                        f"{where}: {at} overrides train.{key}, which every SAE of a sweep shares (one stream of "
                        f"batches, one run's logistics); set it in the train section, or train that SAE in its "
                        f"own run")
                overrides[key] = _check_type(value, hints[key], f"{at}.{key}", where)
            name = entry.get("name")
            if name is not None:
                if not isinstance(name, str) or not _MEMBER_NAME.fullmatch(name) or name.endswith(_RESERVED):
                    raise ConfigError(f"{where}: {at}.name = {name!r}: use letters, digits and _ . + - (a folder "
                                      f"name; not ending in {' or '.join(_RESERVED)})")
            elif overrides:
                name = "_".join(_name_part(k, v) for k, v in _named(written).items())
            if name in seen:
                what = f"name {name!r}" if name is not None else "the plain config ({})"
                raise ConfigError(f"{where}: {at} and train.sweep[{seen[name]}] are both {what}; give one of them "
                                  f"another `name`, or drop the repeat")
            seen[name] = i
            member = dataclasses.replace(self, sweep=None, **overrides)
            member.validate(f"{where}: {at}")
            out.append((name, member))
        return out

    def _member_sae(self, value, at: str, where: str):
        """A sweep entry's `sae` overrides on top of this section's. A member of another architecture
        keeps the settings the two share (k from topk to batchtopk), the rest its own defaults."""
        from pipeline.saes import architecture

        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {at.rstrip('.')} must be a mapping")
        base = dataclasses.asdict(self.sae)
        name = value.get("architecture", base["architecture"])
        if name != base["architecture"]:
            own = {f.name for f in dataclasses.fields(architecture(name, f"{where}: {at}architecture =").Settings)}
            base = {k: v for k, v in base.items() if k in own and k != "architecture"}
        return sae_section({**base, **value}, at, where)

    def validate(self, where):
        if self.n_latents is not None:
            _positive(where, "train.n_latents", self.n_latents)
        _positive(where, "train.expansion_factor", self.expansion_factor)
        self.sae.validate(where)
        _positive(where, "train.n_tokens", self.n_tokens)
        _positive(where, "train.batch_size", self.batch_size)
        _choice(where, "train.optimizer", self.optimizer, OPTIMIZERS)
        _choice(where, "train.lr_schedule", self.lr_schedule, ("cosine", "wsd"))
        if not 0 < self.sf_beta < 1:
            raise ConfigError(f"{where}: train.sf_beta = {self.sf_beta} must be in (0, 1)")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"{where}: train.lr = {self.lr} must be > 0")
        _positive(where, "train.warmup_steps", self.warmup_steps, minimum=0)
        if not 0 <= self.decay_start <= 1:
            raise ConfigError(f"{where}: train.decay_start = {self.decay_start} must be in [0, 1]")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"{where}: train.adam_betas = {self.adam_betas} must be two numbers in [0, 1)")
        if not self.adam_eps > 0:
            raise ConfigError(f"{where}: train.adam_eps = {self.adam_eps} must be > 0")
        _positive(where, "train.init_sample", self.init_sample)
        _choice(where, "train.b_pre_init", self.b_pre_init, ("geometric_median", "mean", "zeros"))
        _choice(where, "train.normalize", self.normalize, ("none", "scalar", "layer_norm"))
        _choice(where, "train.autocast", self.autocast, ("auto", *dtypes.SHORT_NAMES, "none"))
        _choice(where, "train.backend", self.backend, BACKENDS)
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"{where}: train.eval_fraction = {self.eval_fraction} must be in [0, 1)")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"{where}: train.ema_decay = {self.ema_decay} must be in (0, 1)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"{where}: train.grad_clip = {self.grad_clip} must be > 0")
        for key in ("eval_every", "eval_tokens", "log_every", "checkpoint_every", "reader_threads"):
            _positive(where, f"train.{key}", getattr(self, key))
        if self.shuffle_chunks is not None:
            _positive(where, "train.shuffle_chunks", self.shuffle_chunks)
        if self.transcode is not None:
            if not isinstance(self.transcode, dict) or not self.transcode:
                raise ConfigError(f"{where}: train.transcode = {self.transcode!r} must map input hooks to the hooks "
                                  "they predict, e.g. {mlp_in: mlp_out}")
            for src, dst in self.transcode.items():
                for hook in (src, dst):
                    if not isinstance(hook, str) or (hook not in NAMED_HOOKS and not _is_module_path(hook)):
                        raise ConfigError(f"{where}: train.transcode: unknown hook {hook!r}; use one of "
                                          f"{', '.join(NAMED_HOOKS)} or a dotted module path inside the block")
                if src == dst:
                    raise ConfigError(f"{where}: train.transcode maps {src} to itself; that is an SAE: leave "
                                      f"{src} out of train.transcode")
        self.members(where)

    def target_hook(self, hook: str) -> str | None:
        """The hook a transcoder on `hook` predicts (train.transcode), None for an SAE."""
        return (self.transcode or {}).get(hook)


# What the one stream of batches of a sweep is made of (pipeline.loader, train.plan_sae), so every
# member shares it: the batches, their count, their order, the rows held out and the rows dropped.
# The logistics (run_lock, checkpoint steps, eval rows, device) are shared too.
SWEEP_SHARED = ("batch_size", "n_tokens", "seed", "eval_fraction", "shuffle_chunks", "exclude_bos", "skip_nonfinite",
                "transcode")
_MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_RESERVED = (".partial", ".old", ".tmp")  # the suffixes of a folder's work, swap and temp names (fsio, train)


def _named(entry: dict) -> dict:
    """A sweep entry's overrides as its derived name spells them: the sae settings flat (`k64`, as
    before `sae:` existed, so a member keeps its folder), the architecture by its name alone."""
    out = {}
    for key, value in entry.items():
        if key == "sae" and isinstance(value, dict):
            out.update({k if k != "architecture" else "": v for k, v in value.items()})
        elif key != "name":
            out[key] = value
    return out


def sae_section(raw, prefix: str, where: str):
    """`train.sae`: the Settings dataclass of the architecture it names (topk when none)."""
    from pipeline.saes import DEFAULT, architecture

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.')} must be a mapping")
    cls = architecture(raw.get("architecture", DEFAULT), f"{where}: {prefix}architecture =")
    return _build(cls.Settings, raw, prefix, where)


def _name_part(key: str, value) -> str:
    """`k` 16 -> `k16`; a folder-safe piece of a member's derived name."""
    text = "-".join(map(str, value)) if isinstance(value, list) else "null" if value is None else str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", f"{key}{text}")


@dataclass
class CollateConfig:
    layers: list[int] | None = setting(None, "null = train.layers, then harvest.layers", logistics=True)
    hooks: list[str] | None = setting(None, "null = train.hooks, then harvest.hooks", logistics=True)
    n_top: int = setting(50, "largest activations kept per latent, at most one per sequence")
    n_random: int = setting(20, "uniform sample of positive activations per latent")
    n_quantiles: int = setting(5, "equal-width intervals of each latent's (0, max activation], bounds snapped to "
                                  "its histogram's bin edges, each sampled beside top and random; 0 = none")
    n_per_quantile: int = setting(5, "uniform sample of the positive activations in each interval")
    seed: int = setting(0, "the random and quantile samples")
    batch_size: int = setting(4096, "tokens per encode batch (rounded down to whole sequences)", logistics=True)
    window: int | None = setting(None, "tokens each side of the selected one; null = the whole stored sequence")
    hist_bin_width: float = setting(0.2, "activation histogram bin width (sae-viewer's: key = ceil(act / width))")
    hist_max_bins: int = setting(64, "a latent past the last bin doubles its width (recorded per latent)")
    ultra_rare_density: float = setting(1e-5, "summary.json counts live latents below this density")
    device: str = setting("auto", "auto (cuda when present, else cpu), cpu, cuda, cuda:1", logistics=True)
    exclude_bos: bool = setting(True, "leave out position 0 when the store prepended BOS (or CLS)")
    reader_threads: int = setting(4, "threads reading and decompressing chunks", logistics=True)
    cooccurrence_max_latents: int = setting(8192, "count each latent's co-firing partners only for SAEs of at most "
                                                  "this many latents: an exact n x n int32 table of the pairs, 4n² "
                                                  "bytes (256 MiB at 8192; one per sweep member); 0 = never")

    def validate(self, where):
        _positive(where, "collate.n_top", self.n_top, minimum=0)
        _positive(where, "collate.n_random", self.n_random, minimum=0)
        _positive(where, "collate.n_quantiles", self.n_quantiles, minimum=0)
        _positive(where, "collate.n_per_quantile", self.n_per_quantile, minimum=0)
        _positive(where, "collate.batch_size", self.batch_size)
        _positive(where, "collate.reader_threads", self.reader_threads)
        _positive(where, "collate.cooccurrence_max_latents", self.cooccurrence_max_latents, minimum=0)
        if self.window is not None:
            _positive(where, "collate.window", self.window, minimum=0)
        if not self.hist_bin_width > 0:
            raise ConfigError(f"{where}: collate.hist_bin_width must be > 0")
        if self.hist_max_bins < 2 or self.hist_max_bins % 2:
            raise ConfigError(f"{where}: collate.hist_max_bins = {self.hist_max_bins} must be an even number >= 2")
        if self.n_quantiles > self.hist_max_bins:
            raise ConfigError(f"{where}: collate.n_quantiles = {self.n_quantiles} must be <= collate.hist_max_bins = "
                              f"{self.hist_max_bins}: the intervals are made of histogram bins")
        if not 0 < self.ultra_rare_density < 1:
            raise ConfigError(f"{where}: collate.ultra_rare_density must be in (0, 1)")


@dataclass
class EvalConfig:
    layers: list[int] | None = setting(None, "null = train.layers, then harvest.layers", logistics=True)
    hooks: list[str] | None = setting(None, "null = train.hooks, then harvest.hooks", logistics=True)
    n_tokens: int = setting(65536, "held-out tokens: whole windows of the harvest's corpus taken past the "
                                   "harvested ones (never tokens the SAE was trained on)")
    batch_size: int = setting(8, "sequences per forward pass", logistics=True)
    device: str = setting("auto", "auto (cuda when present, else cpu), cpu, cuda, cuda:1", logistics=True)

    def validate(self, where):
        _positive(where, "eval.n_tokens", self.n_tokens)
        _positive(where, "eval.batch_size", self.batch_size)


@dataclass
class FinetuneConfig:
    layers: list[int] | None = setting(None, "null = train.layers, then harvest.layers", logistics=True)
    hooks: list[str] | None = setting(None, "null = train.hooks, then harvest.hooks", logistics=True)
    n_tokens: int = setting(40960, "tokens forwarded through the model: whole windows of the store's own tokens "
                                   "(its training chunks only; eval's windows lie past the store)")
    batch_size: int = setting(8, "windows per step")
    lr: float = setting(3e-4, "peak learning rate (Adam), after a linear warm-up")
    warmup: float = setting(0.1, "fraction of the steps of linear warm-up")
    lr_schedule: str = setting("constant", "after the warm-up: constant (the peak to the end: at these budgets "
                                           "the weights are still far from done) or cosine (decay to 0)")
    recon_coefficient: float = setting(0.0, "weight of the SAE's reconstruction FVU (its training space) beside "
                                            "the KL of the clean to the spliced model: keeps the reconstruction "
                                            "near the activations")
    calibrate: bool = setting(True, "a threshold SAE's inference threshold (batchtopk, matryoshka) follows the "
                                    "encoder: each batch re-fits it so that its positions keep k latents on "
                                    "average, and the end re-fits it to the rows train held out; false: the "
                                    "trained threshold stays, and L0 drifts as the encoder moves")
    seed: int = setting(0, "the order of the windows")
    checkpoint_every: int = setting(20, "steps between checkpoints (resume after a kill)", logistics=True)
    device: str = setting("auto", "auto (cuda when present, else cpu), cpu, cuda, cuda:1", logistics=True)

    def validate(self, where):
        _positive(where, "finetune.n_tokens", self.n_tokens)
        _positive(where, "finetune.batch_size", self.batch_size)
        _positive(where, "finetune.checkpoint_every", self.checkpoint_every)
        if not self.lr > 0:
            raise ConfigError(f"{where}: finetune.lr = {self.lr} must be > 0")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"{where}: finetune.warmup = {self.warmup} must be in [0, 1)")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"{where}: finetune.lr_schedule = {self.lr_schedule!r} must be constant or cosine")
        if not self.recon_coefficient >= 0:
            raise ConfigError(f"{where}: finetune.recon_coefficient = {self.recon_coefficient} must be >= 0")


@dataclass
class ExplainConfig:
    layers: list[int] | None = setting(None, "null = collate.layers, then train.layers, then harvest.layers",
                                       logistics=True)
    hooks: list[str] | None = setting(None, "null = collate.hooks, then train.hooks, then harvest.hooks",
                                      logistics=True)
    n_top: int = setting(5, "building examples per latent from its top records (the first n_top collate kept)")
    n_random: int = setting(15, "building examples per latent from its random records (the first n_random; "
                                "collate.n_random caps it): the typical firings, which the scores' recall "
                                "counts, where the top records are the extreme ones")
    n_quantile: int = setting(5, "building examples per latent from each of its quantile intervals (the first "
                                 "n_quantile of collate's n_per_quantile): firings from every part of its range")
    max_suffix: int = setting(6, "the longest pattern searched, in tokens ending at the activating one; an "
                                 "example that needs more context stays unexplained. The forwards grow as "
                                 "context_size * (max_suffix + 1) tokens per window with examples")
    importance_threshold: float = setting(0.9, "a suffix token whose replacement by the pad token lowers the "
                                               "suffix's own activation by less than this fraction becomes a "
                                               "wildcard: only the tokens the latent cannot fire without stay, "
                                               "so the patterns recall its weaker firings (mean F1 on the demo's "
                                               "block 3: 0.185 at 0.5, 0.207 at 0.75, 0.216 at 0.9)")
    n_score_windows: int = setting(128, "the store's last windows, held out: no building example comes from them, "
                                        "and every explanation is scored on them")
    n_select_windows: int = setting(128, "the windows before the scoring ones, also held out from building: each "
                                         "latent's patterns are cut to the context depth (elements kept, the "
                                         "activating token's included) whose F1 is best on them. 0 = no cut. Mean "
                                         "F1 on the demo's block 6: 0.214 uncut, 0.254 cut")
    batch_tokens: int = setting(4096, "tokens per forward batch (rows padded to the longest)", logistics=True)
    chunk_windows: int = setting(32, "windows per unit of work; a checkpoint after each, where a killed run "
                                     "resumes", logistics=True)
    device: str = setting("auto", "auto (cuda when present, else cpu), cpu, cuda, cuda:1", logistics=True)

    def validate(self, where):
        _positive(where, "explain.n_top", self.n_top, minimum=0)
        _positive(where, "explain.n_random", self.n_random, minimum=0)
        _positive(where, "explain.n_quantile", self.n_quantile, minimum=0)
        if self.n_top + self.n_random + self.n_quantile == 0:
            raise ConfigError(f"{where}: explain.n_top, n_random and n_quantile are all 0: no building examples")
        _positive(where, "explain.max_suffix", self.max_suffix)
        if not 0 < self.importance_threshold <= 1:
            raise ConfigError(f"{where}: explain.importance_threshold = {self.importance_threshold} must be in (0, 1]")
        _positive(where, "explain.n_score_windows", self.n_score_windows)
        _positive(where, "explain.n_select_windows", self.n_select_windows, minimum=0)
        _positive(where, "explain.batch_tokens", self.batch_tokens)
        _positive(where, "explain.chunk_windows", self.chunk_windows)


@dataclass
class Config:
    run_dir: str = setting(doc="where the store, SAEs and records go")
    model: ModelConfig
    data: DataConfig
    harvest: HarvestConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    collate: CollateConfig = field(default_factory=CollateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    store: str | None = setting(None, "where the activation store lives; null = `<run_dir>/activations.zarr`. Another "
                                      "folder, or an fsspec URL that outlives the process: s3://bucket/prefix/acts.zarr, "
                                      "gs://... (progress logs, locks, SAEs and records stay in run_dir)")
    store_options: dict | None = setting(None, "fsspec options for a URL store, e.g. {endpoint_url: "
                                               "http://127.0.0.1:9000} for a local S3 server; keep credentials in "
                                               "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def value_of(self, key: str):
        """The value of a dotted key (`data.path`)."""
        node = self
        for part in key.split("."):
            node = getattr(node, part)
        return node

    def as_written(self, key: str):
        """A path setting (PATH_KEYS) as the config file or --set spells it. load_config makes them
        absolute; fingerprints record this text instead, so they do not depend on the folder saepipe
        runs from, and stores fingerprinted before paths were made absolute stay current."""
        return copy.deepcopy(self._written[key]) if key in self._written else self.value_of(key)

    def path_notes(self) -> list:
        """How load_config read each relative path setting (pipeline.paths.ConfigPath: written, path,
        why there), for messages about a path that is not found."""
        return list(self._notes)

    def __post_init__(self):
        # Not settings: what load_config made absolute (as_written, path_notes); empty for config_from_dict
        # and for a copy made by dataclasses.replace (whose paths then fingerprint as they are).
        self._written: dict[str, Any] = {}
        self._notes: list = []

    def validate(self, where):
        for section in (self.model, self.harvest, self.train, self.collate, self.eval, self.finetune,
                        self.explain):
            section.validate(where)
        self._validate_store(where)
        for hook in self.harvest.hooks:
            if hook not in NAMED_HOOKS and not _is_module_path(hook):
                raise ConfigError(
                    f"{where}: unknown hook {hook!r}; use one of {', '.join(NAMED_HOOKS)} "
                    "or a dotted module path inside the block (e.g. mlp.act)"
                )

    def _validate_store(self, where):
        url = self.store
        if url is None or not is_url(url):
            if self.store_options:
                raise ConfigError(f"{where}: store_options apply to a URL store only (store: s3://...); "
                                  f"store is {url!r}: drop store_options or give store a URL")
            return
        protocol = url.split("://", 1)[0]
        import fsspec  # only URL stores need it

        try:
            fs = fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{where}: store = {url!r}: no filesystem for {protocol}:// ({why}); install its "
                              "fsspec package (s3fs for s3://, gcsfs for gs://) or fix the URL") from None
        from fsspec.implementations.memory import MemoryFileSystem

        # Each saepipe command is its own process: a store in one process's memory is gone before
        # train or collate could read it. (The Python API still takes one: pipeline.store.Location.)
        if issubclass(fs, MemoryFileSystem):
            raise ConfigError(f"{where}: store = {url!r} lives in one process's memory and is lost when harvest "
                              "exits, before any later stage can read it; give a folder or a lasting URL "
                              "(s3://bucket/prefix/acts.zarr)")

    def targets(self, stage: str, layers: list[int] | None = None) -> list[tuple[int, str]]:
        """The (layer, hook) pairs a stage works on: `--layers` or the stage's own layers/hooks,
        else those of the stage before it (collate -> train -> harvest), de-duplicated in order."""
        chain = _FALLBACK[stage]
        layers = layers or next(s.layers for s in (getattr(self, n) for n in chain) if s.layers)
        hooks = next(s.hooks for s in (getattr(self, n) for n in chain) if s.hooks)
        return [(layer, hook) for layer in dict.fromkeys(layers) for hook in dict.fromkeys(hooks)]

    def sae_targets(self, stage: str, layers: list[int] | None = None) -> list[tuple[int, str, str | None]]:
        """Every SAE a stage after train works on: (layer, hook, member) for each of targets() and each
        member of train.sweep (member None: the plain folder; the only one without a sweep).
        The stages that read SAEs (eval, collate, explain) also take each one's KL fine-tuned copy
        (pipeline.finetune) when it has been made, so before and after sit side by side."""
        from pipeline.paths import finetuned, sae_dir
        from pipeline.saes import saved_marker

        names = [name for name, _ in self.train.members()]
        out = [(layer, hook, name) for layer, hook in self.targets(stage, layers) for name in names]
        if stage in ("eval", "collate", "explain"):
            out += [(layer, hook, finetuned(name)) for layer, hook, name in out
                    if saved_marker(sae_dir(self.run_path, layer, hook, finetuned(name))) is not None]
        return out


# Where a stage without its own layers/hooks takes them from (harvest always has both).
_FALLBACK = {"harvest": ("harvest",), "train": ("train", "harvest"), "collate": ("collate", "train", "harvest"),
             "eval": ("eval", "train", "harvest"), "finetune": ("finetune", "train", "harvest"),
             "explain": ("explain", "collate", "train", "harvest")}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override (`a.b=value`, value parsed as YAML), type-check and validate.

    The path settings come out absolute, read as pipeline.paths.resolve_config_paths says: a relative
    one from the project folder of the file (the nearest folder at or above it holding pyproject.toml
    or .git: for configs/*.yaml, the repository's top), one given by --set from the current folder.
    So every stage finds the run wherever saepipe is started; Config.as_written keeps the text."""
    path = Path(path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {where} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections at the top level")
    for item in overrides:
        _apply_override(raw, item, where)
    cfg = _build(Config, raw, "", where)
    _resolve_paths(cfg, path, [item.split("=", 1)[0].strip() for item in overrides])
    cfg.validate(where)
    return cfg


# The settings that name files or folders (pipeline.paths.resolve_config_paths says which values are paths).
PATH_KEYS = ("run_dir", "store", "model.name", "data.path", "data.data_files")


def _resolve_paths(cfg: Config, config_file: Path, typed: list[str]):
    """Make cfg's relative path settings absolute (see load_config), keeping what was written."""
    values = {key: cfg.value_of(key) for key in PATH_KEYS}
    typed_keys = {key for key in PATH_KEYS for t in typed if key == t or key.startswith(t + ".")}
    found = resolve_config_paths(values, config_file, typed_keys)
    for key, resolved in found.items():
        section, _, name = key.rpartition(".")
        node = getattr(cfg, section) if section else cfg
        if isinstance(resolved, list):  # data.data_files: an entry that is no local path stays as written
            setattr(node, name, [r.path if r else v for r, v in zip(resolved, values[key])])
        else:
            setattr(node, name, resolved.path)
        cfg._written[key] = values[key]
        cfg._notes.extend(r for r in (resolved if isinstance(resolved, list) else [resolved]) if r)


def config_from_dict(raw: dict, where: str = "<dict>") -> Config:
    cfg = _build(Config, raw, "", where)
    cfg.validate(where)
    return cfg


def parse_layers(text: str | None) -> list[int] | None:
    """`"3,4"` or `"3 4"` -> [3, 4]; empty -> None (use the config's)."""
    if text is None or not str(text).strip():
        return None
    try:
        return [int(t) for t in str(text).replace(",", " ").split()]
    except ValueError:
        raise UserError(f"--layers {text!r}: expected layer numbers such as 3,4 or '3 4'") from None


def _apply_override(raw: dict, item: str, where: str):
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. harvest.n_tokens=100000")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        if node.get(p) is None:  # absent, or an empty section (`train:`)
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {p} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"--set {item!r}: value is not valid YAML") from None


def _build(cls, raw, prefix: str, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping")
    if hasattr(cls, "lift"):
        raw = cls.lift(raw, prefix, where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{where}: unknown key {prefix}{key} (known keys here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in raw:
            if required and not dataclasses.is_dataclass(hints[name]):
                raise ConfigError(f"{where}: missing required key {key}")
            if required:
                raise ConfigError(f"{where}: missing required section {key}")
            continue
        tp = hints[name]
        if f.metadata.get("section"):
            kwargs[name] = sae_section(raw[name], key + ".", where)
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], key + ".", where)
        else:
            kwargs[name] = _check_type(raw[name], tp, key, where)
    return cls(**kwargs)


def _check_type(value: Any, tp, key: str, where: str):
    ok, converted = _coerce(value, tp)
    if not ok:
        raise ConfigError(f"{where}: {key} = {value!r} should be {_type_name(tp)}")
    return converted


def _coerce(value, tp):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, None
    if tp is type(None):
        return value is None, None
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (int, str)) and not isinstance(value, bool) and item in (int, str):
            value = [value]  # a lone value where a list is expected: `layers: 3`
        if not isinstance(value, list):
            return False, None
        out = []
        for v in value:
            ok, c = _coerce(v, item)
            if not ok:
                return False, None
            out.append(c)
        return True, out
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads `4e-4` (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)  # e.g. revision: 1234
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a mapping"}.get(tp, str(tp))


def _choice(where, key, value, choices):
    if value not in choices:
        raise ConfigError(f"{where}: {key} = {value!r}; choose one of {', '.join(choices)}")


def _positive(where, key, value, minimum=1):
    if value < minimum:
        raise ConfigError(f"{where}: {key} = {value} must be >= {minimum}")


def _is_module_path(hook: str) -> bool:
    return all(part.isidentifier() or part.isdigit() for part in hook.split("."))


# --------------------------------------------------------------------------- the reference, generated
def markdown() -> str:
    """docs/config.md's config reference: one table per section, from the fields' docs."""
    out = ["Keys marked *logistics* change how a run executes, not what it computes: work interrupted or "
           "finished under another value of them still counts (it is resumed, or kept).",
           _table(Config, "", skip_sections=True)]
    for f in dataclasses.fields(Config):
        section = typing.get_type_hints(Config)[f.name]
        if dataclasses.is_dataclass(section):
            out += [f"### `{f.name}:`", _table(section, f.name + ".")]
            out += [part for sub in dataclasses.fields(section) if sub.metadata.get("section")
                    for part in _architecture_tables(f"{f.name}.{sub.name}")]
    return "\n\n".join(out) + "\n"


def _architecture_tables(prefix: str) -> list[str]:
    """One table of `train.sae` per architecture: its own settings. (Written flat in the train
    section, `train.k`, as older configs do, they mean the same.)"""
    from pipeline.saes import ARCHITECTURES

    out = []
    for name, cls in ARCHITECTURES.items():
        out += [f"#### `{prefix}:` with `architecture: {name}`", _table(cls.Settings, prefix + ".")]
    return out


def _table(cls, prefix: str, skip_sections: bool = False) -> str:
    hints = typing.get_type_hints(cls)
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        if skip_sections and dataclasses.is_dataclass(hints[f.name]):
            continue
        if f.metadata.get("section"):
            rows.append(f"| `{prefix}{f.name}:` | | {f.metadata['doc']} |")
            continue
        if f.default is not dataclasses.MISSING:
            default = f"`{_yaml(f.default)}`"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"`{_yaml(f.default_factory())}`"
        else:
            default = "required"
        doc = ("*logistics*: " if f.metadata.get("logistics") else "") + f.metadata.get("doc", "")
        rows.append(f"| `{prefix}{f.name}` | {default} | {doc} |")
    return "\n".join(rows)


def _yaml(value) -> str:
    """A default as one would write it in the YAML file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:_}" if value >= 100_000 else str(value)
    if isinstance(value, float):
        return f"{value:g}".replace("e-0", "e-")
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m pipeline.config --markdown   (prints docs/config.md's reference tables)")
    print(markdown(), end="")
