"""modeling_dflare: DFlare block-diffusion speculative decoding for Hugging Face Transformers.

```python
from transformers import AutoModel
import modeling_dflare  # optional: registers the "dflare" model type and the generate() hook

draft = AutoModel.from_pretrained(draft_dir, trust_remote_code=True)
out = target.generate(**inputs, assistant_model=draft, max_new_tokens=256)
print(draft.dflare_stats.acceptance_length)
```
"""

from transformers import AutoConfig, AutoModel

from .configuration_dflare import DFlareConfig, spread_layer_ids
from .generation_dflare import DFlareCandidateGenerator, DFlareStats, check_draft_matches_target, install_generate_hook
from .modeling_dflare import DFlareModel

__version__ = "0.1.0"

AutoConfig.register("dflare", DFlareConfig, exist_ok=True)
AutoModel.register(DFlareConfig, DFlareModel, exist_ok=True)
# save_pretrained then writes auto_map and copies the Hub files (the model and the files it imports).
DFlareConfig.register_for_auto_class()
DFlareModel.register_for_auto_class("AutoModel")

__all__ = [
    "DFlareCandidateGenerator",
    "DFlareConfig",
    "DFlareModel",
    "DFlareStats",
    "check_draft_matches_target",
    "install_generate_hook",
    "spread_layer_ids",
]
