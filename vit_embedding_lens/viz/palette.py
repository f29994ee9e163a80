"""The one palette of the figures and notebooks: one colour per sublayer and per token group.

A reader who learns that the MLP is red in one figure finds it red in every other one, so every
figure (and every notebook) takes its colours from here instead of matplotlib's colour cycle.
Sublayers and token groups use disjoint colours, so a line is never ambiguous. Names are matched
case-insensitively, with the hook-name spellings (``attn_out``, ``mlp_out``, ``resid_post`` ...)
folded onto their sublayer.
"""

from __future__ import annotations

from typing import Dict

#: attention write-in, MLP write-in, residual stream, embeddings, the logits
SUBLAYER_COLORS: Dict[str, str] = {
    "attn": "#1f77b4",  # blue
    "mlp": "#d62728",  # red
    "resid": "#2ca02c",  # green
    "embed": "#7f7f7f",  # grey
    "logits": "#000000",  # black: the class readout (a circuit's last node)
}
_SUBLAYER_ALIASES = {
    "attention": "attn",
    "attn_out": "attn",
    "hook_attn_out": "attn",
    "mlp_out": "mlp",
    "hook_mlp_out": "mlp",
    "resid_post": "resid",
    "resid_pre": "resid",
    "resid_mid": "resid",
    "residual": "resid",
    "embeddings": "embed",
    "readout": "logits",
    "hook_logits": "logits",
}

#: token groups: prefix tokens, image tokens, and image tokens on / off the object
TOKEN_GROUP_COLORS: Dict[str, str] = {
    "cls": "#9467bd",  # purple
    "image": "#ff7f0e",  # orange
    "class": "#17becf",  # cyan
    "context": "#8c564b",  # brown
    "all": "#525252",  # dark grey
}
_GROUP_ALIASES = {
    "class_tokens_only": "class",
    "context_tokens_only": "context",
    "all_tokens": "all",
}

#: attribution methods of the token-removal benchmark (random order is the grey baseline)
METHOD_COLORS: Dict[str, str] = {
    "class_space": "#e377c2",  # pink
    "chefer": "#b8860b",  # dark gold
    "random": "#7f7f7f",  # grey
}

#: circuit figures: the top-scored circuits' curve and the minimal circuit's marker
CIRCUIT_COLORS: Dict[str, str] = {
    "top": "#35193e",  # aubergine
    "minimal": "#e7298a",  # magenta
}

#: colours for anything else (knockout conditions, user groups), none of the ones above
OTHER_COLORS = ("#252525", "#e7ba52", "#7b4173", "#637939", "#393b79", "#969696")

#: the reference lines (chance, 50 %)
REFERENCE_COLOR = "0.5"


def _other(index: int) -> str:
    return OTHER_COLORS[index % len(OTHER_COLORS)]


def sublayer_color(name: str, index: int = 0) -> str:
    """The colour of a sublayer (``attn``, ``mlp``, ``resid``, ``embed`` or a hook spelling of
    them); another name gets the ``index``-th of :data:`OTHER_COLORS`."""
    key = str(name).lower()
    key = _SUBLAYER_ALIASES.get(key, key)
    return SUBLAYER_COLORS.get(key, _other(index))


def token_group_color(name: str, index: int = 0) -> str:
    """The colour of a token group (``cls``/``CLS``, ``image``, ``class``, ``context``, ``all``);
    another name gets the ``index``-th of :data:`OTHER_COLORS`."""
    key = str(name).lower()
    key = _GROUP_ALIASES.get(key, key)
    return TOKEN_GROUP_COLORS.get(key, _other(index))


def method_color(name: str, index: int = 0) -> str:
    """The colour of an attribution method; another name gets the ``index``-th other colour."""
    return METHOD_COLORS.get(str(name), _other(index))
