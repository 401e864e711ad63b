"""The draft model itself (:mod:`modeling_dflare.modeling_dflare`)."""

import torch

from modeling_dflare import DFlareConfig, DFlareModel
from modeling_dflare.testing import make_draft, make_target


def test_loaded_draft_has_its_rotary_frequencies(tmp_path):
    """``inv_freq`` is a non-persistent buffer: a loaded draft recomputes it from its config, never
    leaves it uninitialised."""
    make_draft(make_target("llama")).save_pretrained(tmp_path)
    fresh = DFlareModel(DFlareConfig.from_pretrained(tmp_path)).rotary_emb.inv_freq
    loaded = DFlareModel.from_pretrained(tmp_path).rotary_emb.inv_freq
    torch.testing.assert_close(loaded, fresh)
