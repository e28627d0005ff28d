# %% [markdown]
# # Tutorial: an SAE from Python
#
# After `make demo`, the demo's run holds a TopK SAE on SmolLM2's blocks 3 and 6, its records and
# its eval. This script (jupytext's percent format: open it as a notebook with
# `jupytext --to notebook docs/tutorial.py`, or run it as it is) loads the SAE of block 3, finds
# the latents that fire on a prompt, reads their records, steers with one and measures what
# splicing the SAE in costs the model:
#
#     .venv/bin/python docs/tutorial.py                      # the demo: configs/smollm2.yaml, block 3
#     .venv/bin/python docs/tutorial.py CONFIG LAYER         # another run
#
# The test suite runs it on a tiny model (tests/test_tutorial.py); the output shown on this page
# is the demo's.

# %%
import sys

import torch
import torch.nn.functional as F

import saepipe

config = sys.argv[1] if len(sys.argv) > 1 else "configs/smollm2.yaml"
layer = int(sys.argv[2]) if len(sys.argv) > 2 else 3
prompt = "Return the absolute path of the file, resolving symbolic links."

run = saepipe.open_run(config)
sae = run.sae(layer)
model, tokenizer = run.model()
print(sae)

# %% [markdown]
# ## Which latents fire on a prompt
#
# `run.tokenize` cuts the text as the store's windows were (BOS first when the harvest put one
# there), `saepipe.capture` runs the model up to the SAE's block, and `sae.encode` takes those raw
# activations as they are: no normalisation by hand.

# %%
ids = run.tokenize(prompt)
x = saepipe.capture(model, ids, [(layer, sae.hook)])[(layer, sae.hook)][0]  # [T, d_model]
code = sae.encode(x[1:])  # position 0 is BOS, which the SAE never trained on
acts = code.dense()  # [T - 1, n_latents]
print(f"{ids.shape[1]} tokens, {code.l0().float().mean():.1f} latents firing per token")
strongest = acts.max(0).values.topk(5)
pieces = [tokenizer.decode([t]) for t in ids[0, 1:].tolist()]
for latent, value in zip(strongest.indices.tolist(), strongest.values.tolist()):
    at = int(acts[:, latent].argmax())
    print(f"latent {latent:5d}: {value:6.2f} on {pieces[at]!r}")

# %% [markdown]
# ## Their records
#
# `saepipe collate` wrote each latent's top and random windows, its density over the whole store
# and the tokens its decoder direction promotes (the logit lens). `run.feature` reads one back.

# %%
for latent in strongest.indices.tolist()[:3]:
    rec = run.feature(layer, latent)
    top = rec["top"][0]
    window = "".join(top["tokens"]).replace("\n", "\\n")
    promotes = rec.get("top_upvote_tokens_logits", [])[:5]
    print(f"latent {latent}: density {rec['density']:.2e}, max act {rec['max_act']:.2f}, promotes {promotes}")
    print(f"    its top window: {window[:100]!r}")

# %% [markdown]
# ## Steering with one
#
# The latent's decoder direction added at its hook on every position but BOS, at twice its largest
# activation in the records ("2x"), then greedy decoding, beside the clean continuation.

# %%
latent = strongest.indices.tolist()[0]
texts = run.steer(layer, latent, "The function", strengths=["2x"], max_new_tokens=16)
for key, text in texts.items():
    print(f"{key:>8}: {text!r}")

# %% [markdown]
# ## What splicing the SAE in costs
#
# `saepipe.spliced` puts the SAE's reconstruction in place of the activations it was trained on, as
# `saepipe eval` does. Here on a few stored windows (training text); `run.evaluate()` measures it
# on held-out windows and caches the numbers in the SAE's `eval.json`.

# %%
windows = torch.from_numpy(run.store.read_tokens(0, 8)).long()
targets = windows[:, 1:]


def next_token_loss(logits):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten()).item()


with torch.no_grad():
    clean = next_token_loss(model(input_ids=windows).logits)
    with saepipe.spliced(model, sae):
        spliced = next_token_loss(model(input_ids=windows).logits)
print(f"CE clean {clean:.4f}, with the SAE {spliced:.4f}: delta CE {spliced - clean:.4f} nats/token")
[row] = [r for r in run.evaluate([layer]) if r["hook"] == sae.hook]
print(f"saepipe eval (held out): delta CE {row['delta_ce']:.4f}, KL {row['kl']:.4f}, L0 {row['l0']:.1f}")
