"""Write a trained SAE folder in the layouts SAELens and sparsify load (and, `--format
neuronpedia`, its collated records and explanations as Neuronpedia's feature upload:
pipeline.neuronpedia, which takes every architecture, since it reads records, not weights).

Each architecture lists the formats that can hold it and its name there
(`Dictionary.exports`; as a transcoder, `Dictionary.transcodes`) and adds what else a format needs (`export_extras`: `k`
for TopK, a threshold, ...); any other pairing is refused in one line. For TopK both tools compute the same SAE
as we do; only names and layouts differ:

    ours                   SAELens                 sparsify
    W_enc [n, d]           W_enc [d, n]            encoder.weight [n, d]
    b_lat [n]              b_enc [n]               encoder.bias [n]
    W_dec [n, d]           W_dec [n, d]            W_dec [n, d]
    b_pre [d]              b_dec [d]               b_dec [d]

SAELens encodes relu(topk((x - b_dec) W_enc + b_enc)); sparsify topk(relu(
encoder(x - b_dec))): the same latents as our encode. Scalar normalisation is
already folded into our saved weights, so neither needs to know about it;
per-token layer norm maps to SAELens' normalize_activations "layer_norm" and
has no sparsify equivalent.

A transcoder (cfg.json `transcoder`) takes its input as it is (no b_dec subtracted) and adds
W_skip x [d, d] when it has a skip connection, as both tools' transcoders do: SAELens's
`transcoder` (ReLU: our relu) and `jumprelu_transcoder` (our jumprelu, batchtopk, matryoshka),
with `skip_` variants; sparsify's TopK with `transcode` and `skip_connection`. Its input must
reach it raw: a transcoder trained on layer-normed inputs is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import safetensors.torch
import torch

import pipeline
from pipeline import fsio
from pipeline.errors import UserError
from pipeline.paths import member_folder
from pipeline.saes import Dictionary, load_sae

FORMATS = ("saelens", "sparsify", "neuronpedia")
# TransformerLens names for the hooks harvest knows by name; module-path hooks keep our naming.
_TL_HOOKS = {"resid_post": "hook_resid_post", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
             "mlp_in": "ln2.hook_normalized"}



def export(sae_dir, fmt: str, out, member: str | None = None, np_model_id: str | None = None,
           np_set_name: str | None = None) -> Path:
    """Write the SAE of `sae_dir` (with `member`: the train.sweep member's folder beside it) into `out`.
    `np_model_id`, `np_set_name`: Neuronpedia's model id and source set name (neuronpedia only)."""
    sae_dir = member_folder(sae_dir, member)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} already exists and is not empty; choose a new folder or remove it")
    if fmt == "neuronpedia":  # before loading weights: it needs none, so every architecture has it
        from pipeline import neuronpedia
        return neuronpedia.write(sae_dir, out, np_model_id, np_set_name)
    if np_model_id is not None or np_set_name is not None:
        raise UserError("--np-model-id and --np-set-name name a Neuronpedia upload: they go with --format neuronpedia")
    sae = load_sae(sae_dir)  # a finished, intact SAE or one line saying how to retrain it
    formats, kind = (sae.transcodes, "transcoder") if sae.transcoder else (sae.exports, "SAE")
    if fmt not in formats:
        raise UserError(f"--format {fmt} cannot hold a {sae.architecture} {kind}; export it as "
                        f"{' or '.join(formats) or 'nothing yet'}")
    if sae.transcoder and sae.normalize == "layer_norm":
        raise UserError(f"this transcoder was trained on per-token layer-normed inputs, which --format {fmt} cannot "
                        "apply to a transcoder; retrain it with train.normalize: scalar (or none)")
    tensors, cfg, weights = (saelens if fmt == "saelens" else sparsify)(sae)
    tensors = {k: v for k, v in tensors.items() if v is not None}  # export_extras drops a name with None
    # Build beside the target, then swap it in: a killed or failed export leaves no half-written --out.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    made = fsio.make_dirs(tmp, "--out", out)  # with the parents --out needs, so a failure removes those too
    try:
        # clone: one weight under two names (gated: b_gate is b_enc) must be two tensors on disk
        blob = safetensors.torch.save({k: v.detach().float().cpu().clone().contiguous() for k, v in tensors.items()})
        fsio.write_atomic(tmp / weights, blob)
        fsio.write_atomic(tmp / "cfg.json", json.dumps(cfg, indent=2))
        with fsio.no_interrupt():
            fsio.swap_dir(tmp, out)
    except BaseException:
        if tmp.exists():  # not yet swapped in: nothing of this export is to stay
            shutil.rmtree(made or tmp, ignore_errors=True)
        raise
    return out


def _tl_hook(layer, hook: str | None) -> str:
    return f"blocks.{layer}.{_TL_HOOKS[hook]}" if hook in _TL_HOOKS else f"layers.{layer}.{hook}"


def saelens(sae: Dictionary) -> tuple[dict, dict, str]:
    c = sae.cfg
    hook, layer = c.get("hook"), c.get("layer")
    hook_name = _tl_hook(layer, hook)
    dataset = c.get("dataset") or {}
    extra_tensors, extra_cfg = sae.export_extras("saelens")
    tensors = {"W_enc": sae.W_enc.T, "b_enc": sae.b_lat, "W_dec": sae.W_dec, "b_dec": sae.b_pre, **extra_tensors}
    architecture, transcoding = sae.exports["saelens"], {}
    if sae.transcoder:
        architecture = sae.transcodes["saelens"][sae.W_skip is not None]
        if sae.W_skip is not None:
            tensors["W_skip"] = sae.W_skip
        transcoding = {"d_out": sae.d_in}
    cfg = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        **transcoding,
        **extra_cfg,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not sae.transcoder,
        "normalize_activations": "layer_norm" if sae.normalize == "layer_norm" else "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "model_name": c.get("model"),
            "hook_name": hook_name,
            "hook_layer": layer,
            "context_size": c.get("context_size"),
            "prepend_bos": c.get("prepend_bos"),
            "dataset_path": dataset.get("path") if isinstance(dataset, dict) else dataset,
            "training_tokens": c.get("tokens_trained"),
            # The cfg layout we write is SAELens 6's; without this its loader applies its pre-6 conversion.
            "sae_lens_version": "6.0.0",
            "sae_lens_training_version": None,
            "saepipe_version": pipeline.__version__,
            "saepipe_hook": hook,
            **({"hook_name_out": _tl_hook(layer, c.get("target_hook")), "saepipe_target_hook": c.get("target_hook")}
               if sae.transcoder else {}),
        },
    }
    return tensors, cfg, "sae_weights.safetensors"


def sparsify(sae: Dictionary) -> tuple[dict, dict, str]:
    if sae.normalize == "layer_norm":
        raise UserError("this SAE was trained on per-token layer-normed inputs, which sparsify cannot apply; "
                        "export it with --format saelens (normalize_activations: layer_norm)")
    extra_tensors, extra_cfg = sae.export_extras("sparsify")
    tensors = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_lat, "W_dec": sae.W_dec, "b_dec": sae.b_pre,
               **extra_tensors, **({"W_skip": sae.W_skip} if sae.W_skip is not None else {})}
    unit = bool(torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.n_latents), atol=1e-4))
    cfg = {
        "activation": sae.exports["sparsify"],
        "expansion_factor": max(1, sae.n_latents // sae.d_in),
        "normalize_decoder": unit,  # false after scalar folding: renormalising would change the SAE
        "num_latents": sae.n_latents,
        **extra_cfg,
        "multi_topk": False,
        "skip_connection": sae.W_skip is not None,
        "transcode": sae.transcoder,
        "d_in": sae.d_in,
    }
    return tensors, cfg, "sae.safetensors"
