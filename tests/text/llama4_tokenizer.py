"""A small Llama 4-style tokenizer for tests (no Llama 4 tokenizer file can be downloaded here).

Byte-level BPE trained with `tokenizers` on a few sentences (English, emoji, CJK), a Llama 3/4-style
split pattern, Llama 4's special tokens appended after the merges (as in the published tokenizer, where
they follow the 200000 regular tokens), `<|begin_of_text|>` added by the post-processor, and a chat
template in Llama 4's published prompt format. Saved with transformers' `save_pretrained`, like a
checkpoint's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>",
    "<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>",
    "<|image_start|>", "<|image_end|>", "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>", "<|image|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(4)),
]
STOP_TOKENS = ("<|end_of_text|>", "<|eom|>", "<|eot|>")

# Llama 3's split pattern (Llama 4's is the same idea with more letter classes)
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Once upon a time there was a little compiler that lowered graphs.",
    "Hello, how are you today? I am fine, thank you!",
    "東京は日本の首都です。 你好，世界！ 今日はいい天気ですね。",
    "Emoji: 👋 🎉 🚀 🤖 😀 ❤️ 👍🏽 🇫🇷",
    "def f(x):\n    return x * 2  # numbers 12345 and 3.14",
]

# Llama 4's prompt format (LLAMA4.md): <|begin_of_text|>, then per message
# <|header_start|>ROLE<|header_end|>\n\n CONTENT <|eot|>; the generation prompt opens an assistant header.
CHAT_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_message = messages[0]['content']|trim %}
    {%- else %}
        {%- set system_message = messages[0]['content'][0]['text']|trim %}
    {%- endif %}
    {%- set messages = messages[1:] %}
    {{- "<|header_start|>system<|header_end|>\\n\\n" + system_message + "<|eot|>" }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant', 'tool', 'ipython'] %}
        {{- raise_exception("Unknown role: " + message['role']) }}
    {%- endif %}
    {%- if message['role'] == 'tool' or message['role'] == 'ipython' %}
        {{- "<|header_start|>ipython<|header_end|>\\n\\n" }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {{- message['content'] | tojson }}
        {%- endif %}
    {%- else %}
        {{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for part in message['content'] %}
                {%- if part['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif part['type'] == 'text' %}
                    {{- part['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
    {%- endif %}
    {{- "<|eot|>" }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|header_start|>assistant<|header_end|>\\n\\n' }}
{%- endif %}
"""


def backend_tokenizer(merges: int = 200):
    """The `tokenizers` object: byte-level BPE with ~`merges` merges, then the special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + merges, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A:0",
                                                       pair="<|begin_of_text|> $A:0 <|begin_of_text|> $B:1",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    return tok


def save_tokenizer(directory: Path, template_in_config: bool = False, generation: dict | None = None) -> Path:
    """tokenizer.json, tokenizer_config.json, chat_template.jinja (or the template inside tokenizer_config.json,
    as the published Llama 4 checkpoints keep it), special_tokens_map.json and generation_config.json."""
    from transformers import PreTrainedTokenizerFast
    directory.mkdir(parents=True, exist_ok=True)
    tok = backend_tokenizer()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot|>",
                                 pad_token="<|finetune_right_pad|>", chat_template=CHAT_TEMPLATE,
                                 model_max_length=4096)
    hf.save_pretrained(directory)
    if template_in_config:
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = (directory / "chat_template.jinja").read_text()
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
        (directory / "chat_template.jinja").unlink()
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>", "pad_token": "<|finetune_right_pad|>"}))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    generation = {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": [ids[t] for t in STOP_TOKENS],
                  "pad_token_id": ids["<|finetune_right_pad|>"], "do_sample": True, "temperature": 0.6,
                  "top_p": 0.9, **(generation or {})}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return directory


def model_vocab(directory: Path) -> int:
    """A model vocabulary that covers the tokenizer, rounded up to a multiple of 32."""
    from tokenizers import Tokenizer
    size = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    return -(-size // 32) * 32
