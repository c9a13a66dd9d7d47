"""cai-dpo: Constitutional AI with DPO and PPO, from a written constitution."""

import warnings as _warnings

# peft and TRL read transformers' old `gradient_checkpointing` names internally; transformers 5
# flags each read as a FutureWarning the user cannot act on. Only those messages are silenced.
_warnings.filterwarnings(
    "ignore",
    message=r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated and will be removed in v6",
    category=FutureWarning,
)
