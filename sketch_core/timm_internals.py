"""Where this project leans on timm beyond its public API: the one module that does.

``check_pretrained_weights`` (models.py) must say, before a search starts its cluster, whether
a model's pretrained weights can be had, without downloading them (EVA02-L's are 1.2 GB). timm
resolves where the weights live, and which file names it tries, in private helpers; this module
asks them. tests/test_timm_internals.py fails when a timm upgrade changes their answers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HubWeights:
    """The Hugging Face Hub files timm would load a model's pretrained weights from."""

    repo_id: str
    revision: str | None
    filenames: tuple[str, ...]  # in the order timm tries them


def pretrained_source(name: str) -> tuple[str, object]:
    """Where timm loads ``name``'s pretrained weights from: ("hf-hub", HubWeights), ("url", the
    URL), ("file", a path) or ("", None) when timm has no pretrained weights for the name."""
    import timm
    from timm.models._builder import _resolve_pretrained_source
    from timm.models._hub import _get_safe_alternatives, hf_split

    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is None:
        return "", None
    source, location = _resolve_pretrained_source(pretrained_cfg.to_dict())
    if source != "hf-hub":
        return source, location or None
    # With an hf_hub_filename override, timm returns (hub id, file name).
    hub_id, wanted = location if isinstance(location, tuple) else (location, "pytorch_model.bin")
    repo_id, revision = hf_split(hub_id)
    return source, HubWeights(repo_id, revision, (*_get_safe_alternatives(wanted), wanted))
