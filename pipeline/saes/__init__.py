"""Every dictionary architecture, and the one way to build or load one.

    build_sae(architecture, d_in, n_latents, settings, normalize, backend)   an untrained SAE
    load_sae(folder, device, backend)                                        a finished SAE folder

Each architecture is one module here defining a `Dictionary` subclass (base.py: the
contract) decorated with `@register`; every module of the package is imported below, so
adding an architecture is adding its file. Nothing outside this package names one.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import UserError
from pipeline.saes.base import (LN_EPS, WEIGHTS, Dictionary, TrainOutput, TrainView, read_checked, retrain_hint,
                                saved_cfg, saved_marker, trained, verify_saved)

ARCHITECTURES: dict[str, type[Dictionary]] = {}
DEFAULT = "topk"  # what a cfg.json without an `architecture` key holds (saepipe wrote it before it had others)


def register(cls: type[Dictionary]) -> type[Dictionary]:
    ARCHITECTURES[cls.architecture] = cls
    return cls


def architecture(name: str, where: str = "architecture") -> type[Dictionary]:
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise UserError(f"{where} {name!r} is unknown; choose one of {', '.join(ARCHITECTURES)}") from None


def build_sae(name: str, d_in: int, n_latents: int, settings: dict | None = None, normalize: str = "none",
              backend: str = "auto") -> Dictionary:
    """An untrained SAE; settings not given take the architecture's train.sae defaults."""
    import dataclasses

    cls = architecture(name)
    return cls.from_cfg(d_in, n_latents, {**dataclasses.asdict(cls.Settings()), **(settings or {})}, normalize,
                        backend)


def load_sae(folder, device="cpu", backend: str = "auto") -> Dictionary:
    """The SAE in a finished folder, of whatever architecture its cfg.json names; UserError (one
    line, how to fix) for anything less: no marker, weights that do not match it, an unknown
    architecture."""
    import safetensors.torch
    from safetensors import SafetensorError

    from pipeline.kernels import resolve_backend

    folder = Path(folder)
    blob, cfg = read_checked(folder)
    backend = resolve_backend(backend, device, key="backend")
    cls = architecture(cfg.get("architecture", DEFAULT), f"{folder / 'cfg.json'}: architecture")
    try:
        sae = cls.from_cfg(cfg["d_in"], cfg["n_latents"], cfg, cfg.get("normalize", "none"), backend=backend)
        if cfg.get("transcoder"):
            sae.make_transcoder(bool(cfg.get("skip_connection")))
        sae.load_state_dict(safetensors.torch.load(blob))
    except (KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise UserError(f"{folder} does not hold a saepipe SAE ({str(e).splitlines()[0]}); "
                        f"{retrain_hint(cfg)}") from None
    sae.cfg = cfg
    return sae.to(device)


def _import_all():
    """Import every architecture module of this package: each registers itself."""
    import importlib
    import pkgutil

    # The default first, so it leads every list of architectures (messages, the reference).
    names = sorted((info.name for info in pkgutil.iter_modules(__path__) if info.name != "base"),
                   key=lambda name: name != DEFAULT)
    for name in names:
        importlib.import_module(f"{__name__}.{name}")


_import_all()

__all__ = ["ARCHITECTURES", "LN_EPS", "WEIGHTS", "Dictionary", "TrainOutput", "TrainView", "architecture", "build_sae", "load_sae", "register",
           "saved_cfg", "saved_marker", "trained", "verify_saved"]
