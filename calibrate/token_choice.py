"""Which mask token the tuned decoder returns: chosen on the search split, decided by the shipping rule.

Before any channel is searched, each of SAM's mask tokens (``graphops.mask_token``) is scored on the
cached embeddings, every image on the search's evidence (its own prompt and, by default, 2 derived from
its mask; IoUs averaged): on the search split the token with the highest lower 90% bound of per-image gain
over token 0 is the candidate, and the held-out split decides whether it ships by the rule the reuse map
answers to (``calibrate.shipping``, cross-fitted by default). On 20 splits of four shared sets this
shipped token 1 on every polyp split and token 3 on every COCO split, and nothing on skin lesions and
camouflaged animals; deciding on each held-out image's own prompt alone shipped 2 polyp splits fewer
(benchmarks/README.md, "Which mask token"). The channel search then runs on the shipped token's masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from sam_reuse.calibrate.shipping import Decision, best_on, decide_on_held_out
from sam_reuse.graphops.mask_token import MASK_TOKENS

AUTO = "auto"
MASK_TOKEN_CHOICES = (AUTO, *(str(token) for token in range(MASK_TOKENS)))


@dataclass(frozen=True)
class TokenChoice:
    """The token that ships, the search's candidate and the held-out decision on it (None: chosen by the user)."""

    token: int
    candidate: int
    decision: Decision | None
    search_ious: list[np.ndarray]  # per token, per search image (mean over its prompts)
    held_out_ious: list[np.ndarray]  # per token, per held-out image, on its own prompt


def choose_token(search_ious: Sequence[np.ndarray], held_out_ious: Sequence[np.ndarray],
                 own_prompt_ious: Sequence[np.ndarray], selection: str, force: bool = False) -> TokenChoice:
    """The candidate token on the search split and whether the held-out split ships it over token 0:
    ``held_out_ious`` decide (each image's mean over its prompts), ``own_prompt_ious`` are kept for the report."""
    candidate, _ = best_on(search_ious, np.arange(len(search_ious[0])))
    decision = decide_on_held_out([held_out_ious[0], held_out_ious[candidate]], 1, selection, force)
    return TokenChoice(candidate if decision.ship_tuned else 0, candidate, decision, list(search_ious),
                       list(own_prompt_ious))


def given_token(token: int, search_ious: Sequence[np.ndarray], own_prompt_ious: Sequence[np.ndarray]
                ) -> TokenChoice:
    """The token the user chose (``--mask-token N``): it ships, with every token's figures for the report."""
    return TokenChoice(token, token, None, list(search_ious), list(own_prompt_ious))
