"""Small models with their own word-level tokenizers, built in a temp folder for tests.

- :func:`build_word_policy`: a random 2-layer Llama over a ~30-word vocabulary with a
  ChatML-like chat template (a policy whose output distribution LoRA can move quickly);
- :func:`build_word_encoder`: a random BERT-like sequence classifier (``[CLS] … [SEP]``,
  no chat template), i.e. a preference model whose tokenizer differs from the policy's.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "[CLS]", "[SEP]"]
POLICY_WORDS = [
    "user",
    "assistant",
    "system",
    "good",
    "bad",
    "cat",
    "dog",
    "the",
    "a",
    "is",
    "tell",
    "me",
    "about",
    "topic",
    "please",
    "now",
    "and",
    "it",
    "one",
    "two",
    "three",
    "four",
    "red",
    "blue",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def _tokenizer(words: list[str], *, chat: bool, lowercase: bool):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(words) - set(SPECIALS)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if lowercase:
        tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit() if chat else pre_tokenizers.Whitespace()
    if not chat:
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>" if chat else "[SEP]",
        bos_token="<|im_start|>" if chat else "[CLS]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"] if chat else None,
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def build_word_policy(folder: Path, seed: int = 0, init_range: float = 0.05) -> Path:
    """A random Llama policy over :data:`POLICY_WORDS` saved (model + tokenizer) in ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(POLICY_WORDS, chat=True, lowercase=False)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=init_range,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return Path(folder)


def build_word_encoder(folder: Path, words: list[str], seed: int = 0) -> Path:
    """A random BERT-like scalar-head classifier with a word-level tokenizer over ``words``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = _tokenizer(words + ["human", "assistant", ":", "?", ".", "!", ",", ";", "'"], chat=False, lowercase=True)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return Path(folder)
