"""Show which latents of the trained SAEs fire on a prompt, token by token.

    saepipe inspect CONFIG --prompt "def read(path):" [--layers 3,6] [--top 5] [--latent 17] [--html page.html]

The work is pipeline.inspect's: one forward, each SAE's code of the prompt, printed as a
table (or one latent followed over the prompt) and, with --html, a self-contained page.
"""

from __future__ import annotations

from pipeline import inspect
from pipeline.config import Config


def run(cfg: Config, prompt: str, layers: list[int] | None = None, hook: str | None = None, member: str | None = None,
        top: int = 5, latent: int | None = None, html: str | None = None) -> list[inspect.Codes]:
    return inspect.run(cfg, prompt, layers, hook, member, top, latent, html)
